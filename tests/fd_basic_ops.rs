//! Finite-difference checks (f64) of the elementwise and matrix ops and of the tape itself.

use podgpu::autograd::{ParamKind, ParamStore, Tape};
use podgpu::gradcheck::{assert_close, check, randn, GradCheckOptions};
use podgpu::ops;
use podgpu::rng::Rng;

fn opts() -> GradCheckOptions {
    GradCheckOptions::default()
}

#[test]
fn relu_relu6_add_scale() {
    let mut rng = Rng::new(1);
    // Keep values away from the kinks at 0 and 6, where the derivative does not exist.
    let away = |t: podgpu::Tensor| {
        let v: Vec<f64> = t
            .host::<f64>()
            .iter()
            .map(|&x| if x.abs() < 0.05 { x + 0.1 } else { x * 4.0 })
            .map(|x: f64| if (x - 6.0).abs() < 0.05 { x + 0.1 } else { x })
            .collect();
        podgpu::Tensor::from_vec(t.shape(), v)
    };
    let a = away(randn(&[3, 7], &mut rng));
    let b = away(randn(&[3, 7], &mut rng));
    let mut store = ParamStore::new();
    let r = check(
        &[("a", a), ("b", b)],
        &mut store,
        |t, _, v| {
            let s = ops::add(t, &v[0], &v[1]);
            let x = ops::relu(t, &s);
            let y = ops::relu6(t, &v[1]);
            let z = ops::add(t, &x, &y);
            ops::scale(t, &z, -1.5)
        },
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn linear_and_all_matmul_transposes() {
    let mut rng = Rng::new(2);
    let mut store = ParamStore::new();
    let w = store.add("fc.weight", randn(&[5, 4], &mut rng), ParamKind::Trainable);
    let b = store.add("fc.bias", randn(&[5], &mut rng), ParamKind::Trainable);
    let x = randn(&[3, 4], &mut rng);
    let m = randn(&[5, 3], &mut rng);
    let r = check(
        &[("x", x), ("m", m)],
        &mut store,
        |t, s, v| {
            let (wv, bv) = (t.param(s, w), t.param(s, b));
            let y = ops::linear(t, &v[0], &wv, Some(&bv)); // 3×5
            let p = ops::matmul(t, &y, true, &v[1], true); // (5×3)(3×5) = 5×5
            let q = ops::matmul(t, &p, false, &v[1], false); // 5×3
            ops::matmul(t, &v[1], true, &q, false) // (3×5)(5×3)
        },
        &opts(),
    );
    assert_close(&r, 1e-7);
}

#[test]
fn inference_tape_records_nothing_and_frozen_params_get_no_grad() {
    let mut rng = Rng::new(3);
    let mut store = ParamStore::new();
    let w = store.add("w", randn(&[4, 4], &mut rng), ParamKind::Trainable);
    let p = store.add("pedcc", randn(&[4, 4], &mut rng), ParamKind::Frozen);
    let x = randn(&[2, 4], &mut rng);

    let mut t = Tape::inference();
    let xv = t.constant(x.clone());
    let wv = t.param(&store, w);
    let _ = ops::linear(&mut t, &xv, &wv, None);
    assert_eq!(t.len(), 0, "an inference tape must record nothing");

    let mut t = Tape::train();
    let xv = t.constant(x);
    let (wv, pv) = (t.param(&store, w), t.param(&store, p));
    let h = ops::linear(&mut t, &xv, &wv, None);
    let y = ops::linear(&mut t, &h, &pv, None);
    let l = ops::matmul(&mut t, &y, false, &y, true);
    let ones_col = t.constant(podgpu::Tensor::from_vec(&[2, 1], vec![1.0f64, 1.0]));
    let ones_row = t.constant(podgpu::Tensor::from_vec(&[1, 2], vec![1.0f64, 1.0]));
    let l = ops::matmul(&mut t, &l, false, &ones_col, false);
    let l = ops::matmul(&mut t, &ones_row, false, &l, false);
    t.backward(&l, &mut store);
    assert!(store.get(w).grad.is_some());
    assert!(
        store.get(p).grad.is_none(),
        "the frozen PEDCC head must never get a gradient"
    );
}
