//! The step ledger: an epoch's running sums (loss, correct predictions, the δ schedule's norms) and
//! the numerics guard, kept on the training device so that a training step never waits for it.
//!
//! Before, every step read the loss, the correct count, the norm sum and one norm per trainable
//! tensor back to the host: 60–160 waits per ResNet step on a GPU. Now each step adds its numbers
//! into the ledger on the device and the guard checks every gradient and the loss there; the host
//! reads the ledger (one read) every few steps (`Cadence`), at the end of the epoch and before a
//! mid-epoch checkpoint. The numbers are exactly those the host used to add: the same f32 values
//! accumulated in f64 in the same order, so `metrics.jsonl` does not change, whatever the cadence.
//!
//! The guard: per step, one kernel counts the NaN and ±inf values of every trainable parameter's
//! gradient and of the loss; a second records, for the first bad step only, its step number, its
//! loss and every count, and sets a sticky flag. The SGD update skips while the flag is set
//! (`optim::SkipIf`), so the weights in memory stay those before that step although the host learns
//! of it up to a read later; the error then names the step where it happened.
//!
//! Both devices run the same logic on the same word layout (`cuda::guard::layout`): on a GPU the
//! kernels of cuda/guard.cu, on the CPU their host versions below (`add_step_host`,
//! `guard_count_host`, `guard_finalize_host`), which are the reference the kernels follow. A read
//! is one `Tensor::to_vec_f32` of the words on either device, so `tensor::host_reads` counts it
//! (and `Gpu::host_waits` on a GPU).

use super::anomaly::BadGradient;
use super::tally::EpochTally;
use crate::autograd::{ParamKind, ParamStore};
use crate::cuda::guard::layout as L;
use crate::optim::SkipIf;
use crate::tensor::{DType, Device, Storage, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The environment variable that fixes how many steps pass between two reads of the ledger (a
/// hidden knob for tests and measurements; unset, the cadence adapts to the step time).
pub const READ_EVERY_ENV: &str = "PODGPU_READ_EVERY";

/// The most steps between two reads when the cadence adapts.
pub const MAX_READ_EVERY: usize = 50;

/// `set_read_every`'s value (0: none).
static READ_EVERY_OVERRIDE: AtomicUsize = AtomicUsize::new(0);

/// Fixes the cadence of runs started from now on in this process (`Some(n)`, n ≥ 1), taking
/// precedence over `PODGPU_READ_EVERY`; `None` returns to the environment. For in-process tests and
/// measurements, which must not change the environment of a running process.
pub fn set_read_every(every: Option<usize>) {
    READ_EVERY_OVERRIDE.store(every.unwrap_or(0), Ordering::Relaxed);
}

/// The name the loss has in the guard's table (its last entry).
const LOSS_ENTRY: &str = "loss";

/// What one read of the ledger says.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// Σ (f64)loss · batch size over the epoch's steps (`EpochTally::loss_sum`).
    pub loss_sum: f64,
    /// Σ of the δ schedule's norm sums (`EpochTally::norm_sum`).
    pub norm_sum: f64,
    /// Correctly classified training images (`EpochTally::correct`).
    pub correct: u64,
    /// The latest step's loss (NaN before the first step).
    pub last_loss: f32,
    /// The first step whose loss or gradient was not finite, if one was.
    pub bad: Option<BadStep>,
}

/// The guard's record of the first non-finite step.
#[derive(Clone, Debug, PartialEq)]
pub struct BadStep {
    /// The 1-based global step (as the trainer's messages number them).
    pub step: u64,
    /// That step's loss.
    pub loss: f32,
    /// (NaN, ±inf) counts of every guarded tensor: the trainable parameters' gradients in the
    /// store's order, then the loss.
    pub counts: Vec<(u64, u64)>,
}

/// What went wrong at a bad step, as the trainer reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum NonFinite {
    /// The loss itself was not finite (its value).
    Loss(f64),
    /// The loss was finite (its value) but a gradient was not.
    Gradient { bad: BadGradient, loss: f64 },
}

/// An epoch's ledger on one device.
pub struct StepLedger {
    device: Device,
    /// The words of `cuda::guard::layout`: a GPU buffer, or host f32 storage holding the same bits.
    words: Tensor,
    /// GPU scratch: the guard's counts [2 · entries] and the step's correct count [1].
    counts: Option<Tensor>,
    correct: Option<Tensor>,
    /// Host scratch of the guard's counts (the CPU's `counts`).
    host_counts: Vec<u32>,
    /// Name and size of every guarded tensor in table order: the trainable parameters, the loss.
    guarded: Vec<(String, usize)>,
    /// Steps added since the last read.
    unread: usize,
    /// Whether anything (a step, a guard check) was added since the last read.
    dirty: bool,
    last: Reading,
    /// See `set_device_step`.
    device_step: Option<u64>,
}

impl StepLedger {
    /// A ledger on `device` that continues `start` (the sums of a resumed epoch, or zeros) and
    /// guards the gradients of `store`'s trainable parameters.
    pub fn new(device: Device, start: &EpochTally, store: &ParamStore) -> StepLedger {
        let mut guarded: Vec<(String, usize)> = store
            .iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .map(|p| (p.name.clone(), p.value.numel()))
            .collect();
        guarded.push((LOSS_ENTRY.to_string(), 1));
        let entries = guarded.len();
        let mut w = vec![0f32; L::words(entries)];
        set_f64(&mut w, L::LOSS_SUM, start.loss_sum);
        set_f64(&mut w, L::NORM_SUM, start.norm_sum);
        set_u64(&mut w, L::CORRECT, start.correct as u64);
        set_u32(&mut w, L::ENTRIES, entries as u32);
        set_u32(&mut w, L::LAST_LOSS, f32::NAN.to_bits());
        let last = decode(&w);
        let n = w.len();
        let words = Tensor::from_vec(&[n], w).to_device(device);
        let (counts, correct) = match device {
            Device::Cpu => (None, None),
            Device::Cuda(_) => (
                Some(Tensor::zeros(&[2 * entries], DType::F32, device)),
                Some(Tensor::zeros(&[1], DType::F32, device)),
            ),
        };
        StepLedger {
            device,
            words,
            counts,
            correct,
            host_counts: vec![0; 2 * entries],
            guarded,
            unread: 0,
            dirty: false,
            last,
            device_step: None,
        }
    }

    /// Makes the GPU guard read the step number from this device address (an i64,
    /// `cuda::graph::StepScalars::step_ptr`) instead of its argument: a replayed step's number.
    pub fn set_device_step(&mut self, ptr: Option<u64>) {
        self.device_step = ptr;
    }

    /// Sets the count of unread steps back to `unread` (what it was before a capture that failed:
    /// its `add_step` counted a step whose kernels never ran).
    pub fn restore_unread(&mut self, unread: usize) {
        self.unread = unread;
    }

    /// Counts a step added on the device by a graph replay (whose `add_step` ran only at capture).
    pub fn count_replayed_step(&mut self) {
        self.unread += 1;
        self.dirty = true;
    }

    /// The numerics guard of global step `step` (1-based): checks every trainable gradient in
    /// `store` and `loss`, recording the step if one is not finite and no earlier step was. Run it
    /// after backward and before the optimizer, which skips while `skip_flag` is set.
    pub fn guard(&mut self, step: u64, store: &ParamStore, loss: &Tensor) {
        let mut table: Vec<Option<&Tensor>> = store
            .iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .map(|p| p.grad.as_ref())
            .collect();
        table.push(Some(loss));
        assert_eq!(
            table.len(),
            self.guarded.len(),
            "the parameter store changed during an epoch"
        );
        match self.device {
            Device::Cpu => {
                guard_count_host(&table, &mut self.host_counts);
                let lv = host_scalar(loss) as f32;
                let w = self.words.host_mut::<f32>();
                guard_finalize_host(w, &mut self.host_counts, step, lv);
            }
            Device::Cuda(_) => {
                let counts = self.counts.as_ref().expect("GPU ledger has counts");
                crate::cuda::guard::guard(&self.words, counts, &table, step, self.device_step);
            }
        }
        self.dirty = true;
    }

    /// Adds one step's statistics: its loss (a [1] tensor) times the batch size `batch`, the rows of
    /// `logits` whose argmax is the label (`labels_t` is `loss::labels_tensor` of `labels`), and the
    /// sum of `norms` (`loss::delta_norms`).
    pub fn add_step(
        &mut self,
        loss: &Tensor,
        logits: &Tensor,
        labels_t: &Tensor,
        labels: &[usize],
        norms: &Tensor,
        batch: usize,
    ) {
        match self.device {
            Device::Cpu => {
                let lv = host_scalar(loss);
                let correct = crate::loss::count_correct(logits, labels) as u64;
                let norm_sum = crate::loss::host_norm_sum(norms);
                add_step_host(self.words.host_mut::<f32>(), lv, correct, norm_sum, batch);
            }
            Device::Cuda(_) => {
                let correct = self.correct.as_ref().expect("GPU ledger has a counter");
                crate::cuda::guard::add_step(
                    &self.words,
                    correct,
                    loss,
                    logits,
                    labels_t,
                    norms,
                    batch,
                );
            }
        }
        self.unread += 1;
        self.dirty = true;
    }

    /// The guard's flag, for `Sgd::step_unless`.
    pub fn skip_flag(&self) -> SkipIf<'_> {
        SkipIf {
            words: &self.words,
            index: L::FLAG,
        }
    }

    /// Steps added since the last read.
    pub fn unread(&self) -> usize {
        self.unread
    }

    /// Whether a read would bring anything new (a step or a guard check since the last read).
    pub fn has_news(&self) -> bool {
        self.dirty
    }

    /// The ledger as of now: one host read (a wait on a GPU), or none when nothing was added since
    /// the last read.
    pub fn read(&mut self) -> Reading {
        if self.dirty {
            self.last = decode(&self.words.to_vec_f32());
            self.unread = 0;
            self.dirty = false;
        }
        self.last.clone()
    }

    /// What went wrong at `bad`: the loss, or the first trainable parameter (in the store's order)
    /// whose gradient was not finite, with how many were.
    pub fn describe(&self, bad: &BadStep) -> NonFinite {
        describe(&self.guarded, bad)
    }
}

/// The loss value of a [1] host tensor, read in place.
fn host_scalar(t: &Tensor) -> f64 {
    match t.storage() {
        Storage::F32(v) => v[0] as f64,
        Storage::F64(v) => v[0],
        Storage::Bf16(_) | Storage::Cuda(_) => panic!("host_scalar of a {t:?} (the loss is f32)"),
    }
}

/// See `StepLedger::describe`; `guarded` names the table's entries (the loss last).
pub fn describe(guarded: &[(String, usize)], bad: &BadStep) -> NonFinite {
    let loss = bad.loss as f64;
    let (grads, loss_counts) = bad.counts.split_at(bad.counts.len().saturating_sub(1));
    if loss_counts.iter().any(|&(n, i)| n + i > 0) || !loss.is_finite() {
        return NonFinite::Loss(loss);
    }
    let mut found: Option<BadGradient> = None;
    for ((name, numel), &(nan, inf)) in guarded.iter().zip(grads) {
        if nan + inf == 0 {
            continue;
        }
        match &mut found {
            Some(b) => b.tensors += 1,
            None => {
                found = Some(BadGradient {
                    name: name.clone(),
                    nan: nan as usize,
                    inf: inf as usize,
                    numel: *numel,
                    tensors: 1,
                })
            }
        }
    }
    match found {
        Some(bad) => NonFinite::Gradient { bad, loss },
        // A record without a count cannot be written; say what is known.
        None => NonFinite::Loss(loss),
    }
}

// ---- the host kernels (the reference of cuda/guard.cu) ----

/// `ledger_add_step`: loss_sum += loss · b, norm_sum += norm_sum, correct += correct, last loss.
/// `loss` is the step's loss as the host reads it (an f32 loss converted to f64, exactly).
pub fn add_step_host(words: &mut [f32], loss: f64, correct: u64, norm_sum: f64, batch: usize) {
    let l = get_f64(words, L::LOSS_SUM) + loss * batch as f64;
    set_f64(words, L::LOSS_SUM, l);
    let n = get_f64(words, L::NORM_SUM) + norm_sum;
    set_f64(words, L::NORM_SUM, n);
    let c = get_u64(words, L::CORRECT) + correct;
    set_u64(words, L::CORRECT, c);
    set_u32(words, L::LAST_LOSS, (loss as f32).to_bits());
}

/// `guard_count_f32`: counts[2t], counts[2t + 1] += the NaN and ±inf values of entry t (`None`: a
/// parameter without a gradient, nothing to count).
pub fn guard_count_host(table: &[Option<&Tensor>], counts: &mut [u32]) {
    assert!(counts.len() >= 2 * table.len(), "guard: counts too short");
    for (t, entry) in table.iter().enumerate() {
        let Some(x) = entry else { continue };
        let (nan, inf) = match x.storage() {
            Storage::F32(v) => count_f32(v),
            Storage::F64(v) => v.iter().fold((0, 0), |(n, i), x| {
                (n + x.is_nan() as u32, i + x.is_infinite() as u32)
            }),
            Storage::Bf16(_) | Storage::Cuda(_) => {
                panic!("guard_count_host of a {x:?} (guarded host tensors are f32/f64)")
            }
        };
        counts[2 * t] += nan;
        counts[2 * t + 1] += inf;
    }
}

fn count_f32(v: &[f32]) -> (u32, u32) {
    // The kernel's test on the bits: exponent all ones, mantissa non-zero (NaN) or zero (inf).
    v.iter().fold((0, 0), |(n, i), x| {
        let bits = x.to_bits() & 0x7fff_ffff;
        (
            n + (bits > 0x7f80_0000) as u32,
            i + (bits == 0x7f80_0000) as u32,
        )
    })
}

/// `guard_finalize`: when a count is non-zero and the flag is not set yet, records `step`, `loss`
/// and the counts and sets the flag; zeroes the counts either way.
pub fn guard_finalize_host(words: &mut [f32], counts: &mut [u32], step: u64, loss: f32) {
    let entries = get_u32(words, L::ENTRIES) as usize;
    let counts = &mut counts[..2 * entries];
    let already = get_u32(words, L::FLAG) != 0;
    let bad = counts.iter().any(|&c| c != 0);
    if bad && !already {
        for (i, &c) in counts.iter().enumerate() {
            set_u32(words, L::RECORD + i, c);
        }
        set_u64(words, L::BAD_STEP, step);
        set_u32(words, L::BAD_LOSS, loss.to_bits());
        set_u32(words, L::FLAG, 1);
    }
    counts.fill(0);
}

/// A `Reading` from the ledger's words.
pub fn decode(words: &[f32]) -> Reading {
    let bad = (get_u32(words, L::FLAG) != 0).then(|| {
        let entries = get_u32(words, L::ENTRIES) as usize;
        BadStep {
            step: get_u64(words, L::BAD_STEP),
            loss: f32::from_bits(get_u32(words, L::BAD_LOSS)),
            counts: (0..entries)
                .map(|t| {
                    (
                        get_u32(words, L::RECORD + 2 * t) as u64,
                        get_u32(words, L::RECORD + 2 * t + 1) as u64,
                    )
                })
                .collect(),
        }
    });
    Reading {
        loss_sum: get_f64(words, L::LOSS_SUM),
        norm_sum: get_f64(words, L::NORM_SUM),
        correct: get_u64(words, L::CORRECT),
        last_loss: f32::from_bits(get_u32(words, L::LAST_LOSS)),
        bad,
    }
}

// The words are f32 storage holding other types bit for bit; 8-byte fields are little-endian word
// pairs, as a GPU stores them.
fn get_u32(w: &[f32], i: usize) -> u32 {
    w[i].to_bits()
}

fn set_u32(w: &mut [f32], i: usize, v: u32) {
    w[i] = f32::from_bits(v);
}

fn get_u64(w: &[f32], i: usize) -> u64 {
    get_u32(w, i) as u64 | (get_u32(w, i + 1) as u64) << 32
}

fn set_u64(w: &mut [f32], i: usize, v: u64) {
    set_u32(w, i, v as u32);
    set_u32(w, i + 1, (v >> 32) as u32);
}

fn get_f64(w: &[f32], i: usize) -> f64 {
    f64::from_bits(get_u64(w, i))
}

fn set_f64(w: &mut [f32], i: usize, v: f64) {
    set_u64(w, i, v.to_bits());
}

/// How many steps pass between two reads of the ledger: fixed by `PODGPU_READ_EVERY` (or 1 with
/// `--detect-anomaly`, which checks every step anyway), else adapted after every read from the
/// measured time per step so that the progress line's loss moves about once a second: 1 while a
/// step takes a second or more, at most `MAX_READ_EVERY`.
#[derive(Clone, Debug)]
pub struct Cadence {
    fixed: Option<usize>,
    every: usize,
    steps: usize,
    since: Instant,
}

impl Cadence {
    /// A fixed cadence (`Some(n)`, n ≥ 1) or an adaptive one starting at every step (`None`).
    pub fn new(fixed: Option<usize>) -> Cadence {
        Cadence {
            fixed,
            every: fixed.unwrap_or(1).max(1),
            steps: 0,
            since: Instant::now(),
        }
    }

    /// The cadence of a run: every step with `detect_anomaly`, else `set_read_every` or
    /// `PODGPU_READ_EVERY` when set, else adaptive. Errors on a value that is not a whole number ≥ 1.
    pub fn from_env(detect_anomaly: bool) -> anyhow::Result<Cadence> {
        if detect_anomaly {
            return Ok(Cadence::new(Some(1)));
        }
        match READ_EVERY_OVERRIDE.load(Ordering::Relaxed) {
            0 => {}
            n => return Ok(Cadence::new(Some(n))),
        }
        match std::env::var(READ_EVERY_ENV) {
            Err(_) => Ok(Cadence::new(None)),
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Cadence::new(Some(n))),
                _ => anyhow::bail!(
                    "{READ_EVERY_ENV}={v:?}: expected a whole number of steps ≥ 1 (or leave it \
                     unset to adapt to the step time)"
                ),
            },
        }
    }

    /// Steps between reads now.
    pub fn every(&self) -> usize {
        self.every
    }

    /// Starts timing afresh (at an epoch's start: evaluation and saving are not steps).
    pub fn restart(&mut self) {
        self.steps = 0;
        self.since = Instant::now();
    }

    /// A step was taken; true when the ledger should be read now.
    pub fn step_done(&mut self) -> bool {
        self.steps += 1;
        self.steps >= self.every
    }

    /// The ledger was just read: adapts the cadence to the time per step since the previous read.
    pub fn read_done(&mut self) {
        if self.fixed.is_none() && self.steps > 0 {
            let per_step = self.since.elapsed().as_secs_f64() / self.steps as f64;
            self.every = adapted(per_step);
        }
        self.restart();
    }
}

/// Steps per second, rounded down, between 1 and `MAX_READ_EVERY`.
fn adapted(per_step_s: f64) -> usize {
    if per_step_s > 0.0 && per_step_s.is_finite() {
        ((1.0 / per_step_s).floor() as usize).clamp(1, MAX_READ_EVERY)
    } else {
        MAX_READ_EVERY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_words(entries: usize) -> Vec<f32> {
        let mut w = vec![0f32; L::words(entries)];
        set_u32(&mut w, L::ENTRIES, entries as u32);
        w
    }

    #[test]
    fn add_step_accumulates_in_f64_exactly_as_the_host_did() {
        let mut w = ledger_words(1);
        set_f64(&mut w, L::LOSS_SUM, 0.1);
        set_f64(&mut w, L::NORM_SUM, 7.25);
        set_u64(&mut w, L::CORRECT, 3);
        let (mut loss_sum, mut norm_sum, mut correct) = (0.1f64, 7.25f64, 3u64);
        let steps = [
            (1.234_567_9f32, 9u64, 33.3f64, 16usize),
            (0.987_654_3, 11, 1e-7, 16),
            (2.5e-3, 0, 12345.678, 7),
        ];
        for (lv, c, n, b) in steps {
            add_step_host(&mut w, lv as f64, c, n, b);
            loss_sum += lv as f64 * b as f64;
            norm_sum += n;
            correct += c;
        }
        let r = decode(&w);
        assert_eq!(r.loss_sum.to_bits(), loss_sum.to_bits());
        assert_eq!(r.norm_sum.to_bits(), norm_sum.to_bits());
        assert_eq!(r.correct, correct);
        assert_eq!(r.last_loss, 2.5e-3);
        assert_eq!(r.bad, None);
        // Large counts and sums survive the word pairs.
        set_u64(&mut w, L::CORRECT, (1u64 << 40) + 5);
        assert_eq!(decode(&w).correct, (1 << 40) + 5);
    }

    #[test]
    fn the_guard_counts_nan_and_inf_per_tensor() {
        let a = Tensor::from_vec(&[4], vec![1.0f32, f32::NAN, -f32::NAN, 3e38]);
        let b = Tensor::from_vec(&[3], vec![f32::INFINITY, f32::NEG_INFINITY, f32::MAX]);
        let c = Tensor::from_vec(&[2], vec![f64::NAN, f64::INFINITY]);
        let loss = Tensor::from_vec(&[1], vec![0.5f32]);
        let mut counts = vec![0u32; 10];
        guard_count_host(
            &[Some(&a), None, Some(&b), Some(&c), Some(&loss)],
            &mut counts,
        );
        assert_eq!(counts, vec![2, 0, 0, 0, 0, 2, 1, 1, 0, 0]);
    }

    #[test]
    fn the_guard_records_the_first_bad_step_only_and_stays_set() {
        let entries = 3; // two gradients and the loss
        let mut w = ledger_words(entries);
        let mut counts = vec![0u32; 2 * entries];
        let good = Tensor::from_vec(&[2], vec![1.0f32, 2.0]);
        let nan = Tensor::from_vec(&[2], vec![f32::NAN, 2.0]);
        let inf = Tensor::from_vec(&[2], vec![f32::INFINITY, f32::NAN]);
        let loss = Tensor::from_vec(&[1], vec![0.75f32]);
        // Step 1 fine, step 2 bad in the second tensor, step 3 bad everywhere.
        for (step, table) in [
            (1u64, [Some(&good), Some(&good), Some(&loss)]),
            (2, [Some(&good), Some(&nan), Some(&loss)]),
            (3, [Some(&inf), Some(&inf), Some(&loss)]),
        ] {
            guard_count_host(&table, &mut counts);
            guard_finalize_host(&mut w, &mut counts, step, 0.75);
            assert!(counts.iter().all(|&c| c == 0), "counts are reset");
            assert_eq!(get_u32(&w, L::FLAG) != 0, step >= 2);
        }
        let bad = decode(&w).bad.expect("recorded");
        assert_eq!(bad.step, 2);
        assert_eq!(bad.loss, 0.75);
        assert_eq!(bad.counts, vec![(0, 0), (1, 0), (0, 0)]);
        let names = vec![
            ("conv.weight".to_string(), 2),
            ("fc.weight".to_string(), 2),
            (LOSS_ENTRY.to_string(), 1),
        ];
        match describe(&names, &bad) {
            NonFinite::Gradient { bad, loss } => {
                assert_eq!(loss, 0.75);
                assert_eq!(
                    bad,
                    BadGradient {
                        name: "fc.weight".into(),
                        nan: 1,
                        inf: 0,
                        numel: 2,
                        tensors: 1
                    }
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_non_finite_loss_is_reported_as_the_loss() {
        let names = vec![("w".to_string(), 4), (LOSS_ENTRY.to_string(), 1)];
        let bad = BadStep {
            step: 9,
            loss: f32::INFINITY,
            counts: vec![(4, 0), (0, 1)],
        };
        assert_eq!(describe(&names, &bad), NonFinite::Loss(f64::INFINITY));
    }

    #[test]
    fn the_ledger_skips_reads_when_nothing_changed_and_sets_the_skip_flag() {
        let mut ps = ParamStore::new();
        let w = ps.add(
            "w",
            Tensor::from_vec(&[2], vec![1.0f32, 2.0]),
            ParamKind::Trainable,
        );
        ps.add(
            "frozen",
            Tensor::from_vec(&[1], vec![1.0f32]),
            ParamKind::Frozen,
        );
        let start = EpochTally {
            loss_sum: 1.5,
            correct: 4,
            ..EpochTally::default()
        };
        let mut ledger = StepLedger::new(Device::Cpu, &start, &ps);
        assert!(
            !ledger.has_news(),
            "nothing to read yet: `read` returns the start"
        );
        let r = ledger.read();
        assert_eq!((r.loss_sum, r.correct), (1.5, 4));
        assert!(!ledger.skip_flag().is_set());
        ps.get_mut(w).grad = Some(Tensor::from_vec(&[2], vec![f32::NAN, 0.0]));
        let loss = Tensor::from_vec(&[1], vec![2.0f32]);
        ledger.guard(5, &ps, &loss);
        assert!(ledger.skip_flag().is_set());
        let logits = Tensor::from_vec(&[2, 2], vec![1.0f32, 0.0, 0.0, 1.0]);
        let norms = Tensor::from_vec(&[2], vec![1.0f32, 1.0]);
        let labels_t = crate::loss::labels_tensor(&[0, 0], &logits);
        ledger.add_step(&loss, &logits, &labels_t, &[0, 0], &norms, 2);
        let r = ledger.read();
        assert_eq!((r.loss_sum, r.correct, r.norm_sum), (5.5, 5, 2.0));
        let bad = r.bad.expect("recorded");
        assert_eq!((bad.step, bad.counts.len()), (5, 2));
        match ledger.describe(&bad) {
            NonFinite::Gradient { bad, .. } => assert_eq!(bad.name, "w"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_cadence_reads_about_once_a_second() {
        assert_eq!(adapted(2.0), 1);
        assert_eq!(adapted(0.25), 4);
        assert_eq!(adapted(1e-4), MAX_READ_EVERY);
        assert_eq!(adapted(0.0), MAX_READ_EVERY);
        let mut c = Cadence::new(Some(3));
        let due: Vec<bool> = (0..6)
            .map(|_| {
                let d = c.step_done();
                if d {
                    c.read_done();
                }
                d
            })
            .collect();
        assert_eq!(due, [false, false, true, false, false, true]);
        let mut c = Cadence::new(None);
        assert!(c.step_done(), "an adaptive cadence starts at every step");
        c.read_done();
        assert!(c.every() > 1, "a step this fast reads less often");
    }
}
