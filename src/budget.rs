//! Memory budgets (issue 14): sizes that come from files and flags are checked against what the
//! machine has *before* anything is allocated for them, so that a hostile or mistyped size (a width
//! of 100000, a PEDCC of a million classes, a 30000-pixel image) ends with a message naming the size
//! and the flag to change, not with "memory allocation of N bytes failed" (exit 134) or a machine
//! that swaps itself to a halt.
//!
//! The estimates are deliberately simple (about what a request needs, computed in `u128` so that
//! no product overflows); a request is refused only when it needs more than the machine's memory
//! and swap together, so nothing that could run is refused.

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::OnceLock;

/// The machine's memory: RAM plus swap (Linux `/proc/meminfo`), or `None` where it cannot be read
/// (then nothing is refused on size).
pub fn machine_memory() -> Option<u64> {
    static MEM: OnceLock<Option<u64>> = OnceLock::new();
    *MEM.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        };
        Some(field("MemTotal:")?.saturating_add(field("SwapTotal:").unwrap_or(0)))
    })
}

/// `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn fmt_bytes(b: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Refuses a request of `bytes` that is more than the machine has: `what` says what needs the memory
/// ("a PEDCC of 100000 classes in 2 dimensions"), `advice` what to change ("lower --classes").
pub fn ensure_fits(bytes: u128, what: impl FnOnce() -> String, advice: &str) -> Result<()> {
    if let Some(mem) = machine_memory() {
        if bytes > mem as u128 {
            bail!(
                "{} needs about {} of memory, more than this machine has ({} with swap); {advice}",
                what(),
                fmt_bytes(bytes),
                fmt_bytes(mem as u128)
            );
        }
    }
    Ok(())
}

/// The thread count worth using for a request of `asked`: more threads than the machine has cores
/// only add switching (and a huge count would try to start that many threads). Returns the count and
/// a note when it was capped.
pub fn useful_threads(asked: usize) -> (usize, Option<String>) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(asked);
    if asked > cores {
        (
            cores,
            Some(format!(
                "note: --threads {asked} is more than the {cores} CPU cores of this machine; \
                 using {cores}"
            )),
        )
    } else {
        (asked, None)
    }
}

/// What to change when a network does not fit: the flags for its size (parameters) and for its
/// inputs (activations), as the command that builds it names them.
pub struct NetworkFlags<'a> {
    pub size: &'a str,
    pub inputs: &'a str,
}

/// Refuses a network too large for the machine before it is built: its parameters (from two small
/// builds of the same architecture, at widths 8 and 16, scaled to the width asked for: convolution
/// weights grow with width², the rest linearly; FC1 and the head from the feature dimension and the
/// class count) held with their gradients and momentum when `training`, and the activations of a
/// `batch` of `image` (C, H, W) inputs. The activations are measured where the process counts its
/// allocations (`CountingAlloc`, installed by the `podgpu` binary): a forward pass (recorded for a
/// backward pass when `training`) of the width-8 and width-16 builds at one or two image sizes of at
/// most 256×256, extrapolated in width and pixel count (and doubled for the gradients when
/// `training`); elsewhere at least the input and the first convolution's output. An estimate: a
/// request is refused when it needs more than the machine's memory and swap together.
/// Architectures whose small builds fail are not estimated.
pub fn check_network(
    spec: &crate::nn::ModelSpec,
    image: [usize; 3],
    batch: usize,
    training: bool,
    flags: NetworkFlags<'_>,
) -> Result<()> {
    use crate::autograd::{ParamStore, Tape};
    use crate::nn::{HeadSpec, ModelSpec, Network};
    struct Probe {
        backbone: u128,
        pooled: u128,
        first: Option<[u128; 2]>,
        net: Network,
        ps: ParamStore,
    }
    let probe = |width: usize| -> Option<Probe> {
        let p = ModelSpec {
            width,
            classes: 2,
            feature_dim: 2,
            head: HeadSpec::Linear,
            ..spec.clone()
        };
        let mut ps = ParamStore::new();
        let net = Network::new(p, &mut ps, crate::DType::F32, &mut crate::rng::Rng::new(0)).ok()?;
        let total: u128 = ps.iter().map(|q| q.value.numel() as u128).sum();
        let pooled = ps.value(ps.find("fc.weight")?).dim(1) as u128;
        // FC1 (pooled·2 + 2) and the probe's head (2·2 + 2) are added back for the real sizes.
        let backbone = total.checked_sub(pooled * 2 + 2 + 6)?;
        // The first convolution: [out, in, k, k].
        let first = ps
            .iter()
            .find(|q| q.value.rank() == 4)
            .map(|q| [q.value.dim(0) as u128, q.value.dim(2).max(1) as u128]);
        Some(Probe {
            backbone,
            pooled,
            first,
            net,
            ps,
        })
    };
    let (Some(p8), Some(mut p16)) = (probe(8), probe(16)) else {
        return Ok(());
    };
    let (a8, a16) = (p8.backbone, p16.backbone);
    // a(w) = c2·w² + c1·w through the two probes; a fit that is not plausible (channel counts
    // rounded at small widths) falls back to scaling the larger probe by (w/16)².
    let (c2x, c1x) = (
        (a16 as i128 - 2 * a8 as i128) as f64 / 128.0,
        (4 * a8 as i128 - a16 as i128) as f64 / 16.0,
    );
    let wf = spec.width as f64;
    let backbone = if c2x >= 0.0 && c1x >= 0.0 {
        (c2x * wf * wf + c1x * wf) as u128
    } else {
        (a16 as f64 * (wf / 16.0) * (wf / 16.0)) as u128
    };
    let pooled = (p16.pooled.max(p8.pooled * 2) as f64 * wf / 16.0).ceil() as u128;
    let (n, k) = (spec.feature_dim as u128, spec.classes as u128);
    let params = backbone
        .saturating_add(product(&[pooled + 1, n]))
        .saturating_add(product(&[k, n]))
        .saturating_add(k);
    let copies: u128 = if training { 4 } else { 1 };
    let param_bytes = product(&[params, 4, copies]);
    let [c, h, wd] = image.map(|v| v as u128);
    // Activations per image: measured on the width-8 and width-16 builds where allocations are
    // counted, at the real image size when it is at most 256×256, else at 128×128 and 256×256 (large
    // enough that the matrix products work in blocks of their final size). What grows with the pixels is fitted as a line through the two sizes (working buffers of a fixed size
    // are not multiplied up), and each part as a + b·width through the two widths (the input and
    // the first convolution's unfolded input do not grow with the width, the feature maps do).
    let small = image[1] <= 256 && image[2] <= 256;
    let sizes: Vec<(usize, usize)> = if small {
        vec![(image[1], image[2])]
    } else {
        vec![
            (image[1].min(128), image[2].min(128)),
            (image[1].min(256), image[2].min(256)),
        ]
    };
    // Batch norm in training mode wants two images; one keeps an inference peak free of the
    // second image's working buffers on another thread.
    let probe_batch = if training { 2 } else { 1 };
    let measure_at = |p: &mut Probe, (hp, wp): (usize, usize)| -> Option<f64> {
        if hp < 8 || wp < 8 {
            return None;
        }
        let x = crate::Tensor::from_vec(
            &[probe_batch, image[0], hp, wp],
            vec![0f32; probe_batch * image[0] * hp * wp],
        );
        // An architecture that cannot take the probe's input size (a panic, said by no one) is
        // estimated without the measurement.
        quietly(|| {
            measure(|| {
                let mut tape = if training {
                    Tape::train()
                } else {
                    Tape::inference()
                };
                let x = tape.constant(x);
                let out = p.net.forward(&mut tape, &mut p.ps, &x);
                drop(out);
                drop(tape);
            })
            .1
        })
        .flatten()
        .map(|b| b as f64 / probe_batch as f64)
    };
    let mut p8 = p8;
    let mut at = |s: (usize, usize)| -> Option<(f64, f64)> {
        Some((measure_at(&mut p8, s)?, measure_at(&mut p16, s)?))
    };
    // Bytes per image at width 8 and 16, as (fixed, per pixel) at each width.
    let parts: Option<[(f64, f64); 2]> = match sizes[..] {
        [s] => at(s).map(|(m8, m16)| [(m8, 0.0), (m16, 0.0)]),
        [s1, s2] => match (at(s1), at(s2)) {
            (Some((a8, a16)), Some((b8, b16))) => {
                let (p1, p2) = ((s1.0 * s1.1) as f64, (s2.0 * s2.1) as f64);
                let line = |m1: f64, m2: f64| {
                    let slope = ((m2 - m1) / (p2 - p1)).max(0.0);
                    ((m2 - slope * p2).max(0.0), slope)
                };
                Some([line(a8, b8), line(a16, b16)])
            }
            _ => None,
        },
        _ => None,
    };
    let per_image = match parts {
        Some([(f8, s8), (f16, s16)]) => {
            // a + b·w through the widths 8 and 16 (never below the width-16 value when wider).
            let in_width = |v8: f64, v16: f64| {
                let b = ((v16 - v8) / 8.0).max(0.0);
                let a = (v8 - 8.0 * b).max(0.0);
                let v = a + b * wf;
                if wf >= 16.0 {
                    v.max(v16)
                } else {
                    v
                }
            };
            let pixels = (h * wd) as f64;
            (in_width(f8, f16) + in_width(s8, s16) * pixels) as u128
        }
        None => {
            let first = match (p8.first, p16.first) {
                (Some([o8, k8]), Some([o16, _])) => {
                    let out = (o16.max(o8 * 2) as f64 * wf / 16.0).ceil() as u128;
                    product(&[out, h.div_ceil(k8), wd.div_ceil(k8)])
                }
                _ => 0,
            };
            product(&[c, h, wd]).saturating_add(first).saturating_mul(4)
        }
    };
    let act_bytes = product(&[batch as u128, per_image, if training { 2 } else { 1 }]);
    let bytes = param_bytes.saturating_add(act_bytes);
    let (what, advice) = if param_bytes >= act_bytes {
        (
            format!(
                "{} at width {} with feature dim {} and {} classes (about {:.3e} parameters)",
                spec.arch, spec.width, spec.feature_dim, spec.classes, params as f64
            ),
            flags.size,
        )
    } else {
        (
            format!(
                "{} on {}×{}×{} images in batches of {batch}",
                spec.arch, image[0], image[1], image[2]
            ),
            flags.inputs,
        )
    };
    ensure_fits(bytes, || what, advice)
}

/// Runs `f`, returning None instead of unwinding if it panics, with the panic hook silenced for the
/// time (a probe that fails is not a bug to report).
fn quietly<R>(f: impl FnOnce() -> R) -> Option<R> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    std::panic::set_hook(previous);
    r
}

/// A global allocator that can count: `measure` reports the peak of the bytes allocated while it
/// runs a closure. Outside `measure` it only forwards to the system allocator (one relaxed load).
/// The `podgpu` binary installs it; without it `measure` reports nothing.
pub struct CountingAlloc;

static MEASURING: AtomicBool = AtomicBool::new(false);
static DELTA: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn count(bytes: isize) {
    let now = DELTA.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counting only reads and
// writes atomics.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() && MEASURING.load(Ordering::Relaxed) {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() && MEASURING.load(Ordering::Relaxed) {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        if MEASURING.load(Ordering::Relaxed) {
            DELTA.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() && MEASURING.load(Ordering::Relaxed) {
            count(new as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` and returns its result with the peak number of bytes allocated while it ran (above
/// what was allocated before), or None when `CountingAlloc` is not the global allocator.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    DELTA.store(0, Ordering::SeqCst);
    PEAK.store(0, Ordering::SeqCst);
    MEASURING.store(true, Ordering::SeqCst);
    // Whether allocations are counted at all (the allocator is installed).
    let probe = std::hint::black_box(vec![0u8; 64]);
    let counting = DELTA.load(Ordering::SeqCst) >= 64;
    drop(probe);
    DELTA.store(0, Ordering::SeqCst);
    PEAK.store(0, Ordering::SeqCst);
    let r = f();
    MEASURING.store(false, Ordering::SeqCst);
    let peak = PEAK.load(Ordering::SeqCst).max(0) as usize;
    (r, counting.then_some(peak))
}

/// a·b·… in `u128` (saturating), for size estimates that must not overflow.
pub fn product(factors: &[u128]) -> u128 {
    factors.iter().fold(1u128, |acc, &f| acc.saturating_mul(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 29), "1.50 GiB");
        assert_eq!(fmt_bytes(u128::MAX).split(' ').nth(1), Some("EiB"));
    }

    #[test]
    fn absurd_requests_are_refused_with_the_advice() {
        if machine_memory().is_none() {
            return;
        }
        let e = ensure_fits(product(&[1 << 40, 1 << 40]), || "this".into(), "lower --x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("this needs about") && e.contains("lower --x"),
            "{e}"
        );
        ensure_fits(1024, || "that".into(), "").unwrap();
    }
}
