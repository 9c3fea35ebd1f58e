//! `mpirun -np N dist-check`: checks, across real MPI processes, what data-parallel training rests on
//! (issue 16): every rank sees its own images and together they see each image of an epoch once, and
//! the combined gradient equals the one a single process computes over the whole global batch. Each
//! rank prints one line; rank 0 prints the verdict; the exit status is 0 only when every check holds.
//! `tests/dist_mpi.rs` runs it with 2 and 3 ranks (cargo feature `distributed`).

use podgpu::autograd::{ParamKind, ParamStore};
use podgpu::dist::mpi::MpiWorld;
use podgpu::dist::{grads, shard, Collective};
use podgpu::Tensor;

/// The gradient of mean_i (w·x_i − y_i)² over `idx`, in f32 (what a rank computes over its images).
fn grad_over(w: &[f32], xs: &[Vec<f32>], ys: &[f32], idx: std::ops::Range<usize>) -> Vec<f32> {
    let b = idx.len().max(1) as f32;
    let mut g = vec![0f32; w.len()];
    for i in idx {
        let r: f32 = w.iter().zip(&xs[i]).map(|(a, x)| a * x).sum::<f32>() - ys[i];
        for (gj, xj) in g.iter_mut().zip(&xs[i]) {
            *gj += 2.0 * r * xj / b;
        }
    }
    g
}

fn main() {
    // MPI is finalised when the world drops, inside `check`, before the process exits.
    std::process::exit(check());
}

fn check() -> i32 {
    let world = match MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let (rank, ranks) = (world.rank(), world.size());
    let (n, batch, dim) = (50, 32, 13);
    // The same data on every rank (the same seed), as every rank maps the same dataset file.
    let mut rng = podgpu::rng::Rng::new(7);
    let xs: Vec<Vec<f32>> = (0..n)
        .map(|_| (0..dim).map(|_| rng.normal() as f32).collect())
        .collect();
    let ys: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let w: Vec<f32> = (0..dim).map(|_| rng.normal() as f32).collect();

    let mut ok = true;
    // Every image once per epoch: count what each rank sees, summed over ranks.
    let mut seen = vec![0f64; n];
    for k in 0..shard::global_batches(n, ranks, batch) {
        for i in shard::rank_slice(n, ranks, batch, k, rank) {
            seen[i] += 1.0;
        }
    }
    world
        .all_reduce_sum(&mut seen)
        .expect("MPI stops the job rather than failing a call");
    if seen.iter().any(|&c| c != 1.0) {
        eprintln!("rank {rank}: an image was not seen exactly once: {seen:?}");
        ok = false;
    }
    // The first global batch's gradient, combined across ranks, against one process over it all.
    let idx = shard::rank_slice(n, ranks, batch, 0, rank);
    let mine = idx.len();
    let mut ps = ParamStore::new();
    let id = ps.add(
        "w",
        Tensor::from_vec(&[dim], w.clone()),
        ParamKind::Trainable,
    );
    ps.get_mut(id).grad = Some(Tensor::from_vec(&[dim], grad_over(&w, &xs, &ys, idx)));
    let total = grads::combine_gradients(&world, &mut ps, mine)
        .expect("MPI stops the job rather than failing a call");
    let got = ps.get(id).grad.as_ref().unwrap().to_vec_f64();
    let want: Vec<f64> = grad_over(&w, &xs, &ys, 0..n.min(ranks * batch))
        .iter()
        .map(|&v| v as f64)
        .collect();
    let e = podgpu::tensor::rel_error(&got, &want);
    println!("rank {rank} of {ranks}: {mine} images, global batch {total}, gradient relative error {e:.2e}");
    if total != n.min(ranks * batch) || e.is_nan() || e >= 1e-5 {
        ok = false;
    }
    // Every rank must hold the same bits.
    let mut spread = got.clone();
    world
        .all_reduce_sum(&mut spread)
        .expect("MPI stops the job rather than failing a call");
    if spread
        .iter()
        .zip(&got)
        .any(|(s, g)| *s != *g * ranks as f64)
    {
        eprintln!("rank {rank}: ranks hold different gradients");
        ok = false;
    }
    let mut fails = [if ok { 0.0 } else { 1.0 }];
    world
        .all_reduce_sum(&mut fails)
        .expect("MPI stops the job rather than failing a call");
    if rank == 0 {
        println!(
            "dist-check with {ranks} ranks: {}",
            if fails[0] == 0.0 { "ok" } else { "FAILED" }
        );
    }
    if fails[0] == 0.0 {
        0
    } else {
        1
    }
}
