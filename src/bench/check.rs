//! Checking a benchmarked result against the CPU reference before timing it: the same operation on
//! the CPU in f64, compared tensor by tensor as ‖a − b‖ / ‖b‖.

use crate::tensor::{rel_error, Tensor};

/// The outcome of one check: the largest relative error over the compared tensors and the tolerance.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub max_rel_error: f64,
    pub tolerance: f64,
    /// What failed beyond the tolerance (shape mismatch, NaN, which output), if anything.
    pub problem: Option<String>,
    /// Why no check was made, when none was.
    pub skipped: Option<String>,
}

impl CheckResult {
    /// True unless a check ran and failed.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }

    /// `ok 3.1e-7`, `FAIL 2.0e-2 > 1e-4 (output 1)` or `skipped`, for a table cell.
    pub fn cell(&self) -> String {
        match (&self.problem, &self.skipped) {
            (Some(p), _) => format!("FAIL {p}"),
            (None, Some(_)) => "skipped".into(),
            (None, None) => format!("ok {:.1e}", self.max_rel_error),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok(),
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "problem": self.problem,
            "skipped": self.skipped,
        })
    }

    /// No check made (the reason instead of numbers).
    pub fn skipped(why: &str) -> CheckResult {
        CheckResult {
            max_rel_error: f64::NAN,
            tolerance: f64::NAN,
            problem: None,
            skipped: Some(why.to_string()),
        }
    }
}

/// Compares `got` (any device, f32) with `want` (host, usually f64) output by output.
pub fn check_outputs(got: &[Tensor], want: &[Tensor], tolerance: f64) -> CheckResult {
    let mut worst = 0.0f64;
    let mut problem = None;
    if got.len() != want.len() {
        problem = Some(format!("{} outputs, expected {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.shape() != w.shape() {
            problem.get_or_insert(format!(
                "output {i}: shape {:?}, expected {:?}",
                g.shape(),
                w.shape()
            ));
            continue;
        }
        let (a, b) = (g.to_vec_f64(), w.to_vec_f64());
        if a.iter().any(|v| !v.is_finite()) {
            problem.get_or_insert(format!("output {i} is not finite"));
            continue;
        }
        let e = rel_error(&a, &b);
        worst = worst.max(e);
        if e.is_nan() || e > tolerance {
            problem.get_or_insert(format!("{e:.1e} > {tolerance:.0e} (output {i})"));
        }
    }
    CheckResult {
        max_rel_error: worst,
        tolerance,
        problem,
        skipped: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_outputs_pass_and_far_ones_fail() {
        let want = Tensor::from_vec(&[3], vec![1.0f64, -2.0, 3.0]);
        let near = Tensor::from_vec(&[3], vec![1.0f32, -2.0, 3.000001]);
        assert!(check_outputs(&[near], std::slice::from_ref(&want), 1e-5).ok());
        let far = Tensor::from_vec(&[3], vec![1.0f32, 2.0, 3.0]);
        let r = check_outputs(&[far], std::slice::from_ref(&want), 1e-5);
        assert!(!r.ok());
        assert!(r.cell().starts_with("FAIL"), "{}", r.cell());
        let nan = Tensor::from_vec(&[3], vec![f32::NAN, 2.0, 3.0]);
        assert!(!check_outputs(&[nan], &[want], 1e-5).ok());
    }
}
