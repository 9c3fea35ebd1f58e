//! Data-parallel training's arithmetic across real MPI processes (cargo feature `distributed`):
//! `mpirun -np N dist-check` with 2 and 3 CPU ranks — every image of an epoch seen once across
//! ranks, the combined gradient equal to one process's over the global batch, the same bits on every
//! rank. `.ci/run` installs OpenMPI and runs this file.
#![cfg(feature = "distributed")]

use std::process::Command;

fn mpirun(ranks: usize) -> (bool, String) {
    let out = Command::new("mpirun")
        .args(["-np", &ranks.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_dist-check"))
        // CI runs as root; Open MPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (OpenMPI: apt-get install openmpi-bin libopenmpi-dev)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("--- {ranks} ranks:\n{text}");
    (out.status.success(), text)
}

#[test]
fn two_and_three_cpu_ranks_train_on_every_image_once_with_the_global_batch_gradient() {
    for ranks in [2, 3] {
        let (ok, text) = mpirun(ranks);
        assert!(ok, "{ranks} ranks failed:\n{text}");
        assert!(
            text.contains(&format!("dist-check with {ranks} ranks: ok")),
            "{text}"
        );
        for r in 0..ranks {
            assert!(text.contains(&format!("rank {r} of {ranks}:")), "{text}");
        }
    }
}
