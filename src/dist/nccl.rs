//! GPU ranks' gradients summed on the devices by NCCL (cargo feature `nccl`, which `distributed`
//! includes): Horovod's design, MPI (or any `Collective`) only carries NCCL's unique id.
//!
//! - `DeviceGroup::join`: rank 0 asks NCCL for a unique id, sends its 128 bytes to the others over
//!   the `Collective` (`broadcast_bytes`), and every rank opens its communicator on its own GPU
//!   (`ncclCommInitRank`) with a side stream of its own. One rank alone (`Single`) is NCCL's own
//!   single-process init: the smoke test on a one-GPU machine, no MPI needed.
//! - `DeviceGroup::overlap` → `Overlap`: the sums of one step, started during the backward pass.
//!   As `Tape::backward_then` reports each parameter's final gradient, every bucket whose
//!   gradients are all final (`dist::buckets`: reverse parameter order, ≤ `BUCKET_VALUES` values,
//!   launched in plan order on every rank) goes to NCCL on the side stream: this rank's b_r·g_r
//!   (its mean gradient times its images, known before the vote) summed out of place
//!   (`ncclAllReduce`, f32) into fresh buffers, one NCCL group per bucket, while the compute stream
//!   runs the rest of the backward pass. This rank's own gradients stay untouched for its finite
//!   check and the vote, which gives the global batch B; `Overlap::finish` then sends the buckets
//!   left (parameters without a gradient, or every bucket for a rank without images), makes the
//!   compute stream wait for the side stream once, and sets each gradient to Σ_r b_r·g_r / B, the
//!   global batch's gradient, as `grads` computes it on the host.
//! - `DeviceGroup::combine_gradients`: the same sums after a finished backward pass.
//!
//! What differs from the host path: the sums are f32 in NCCL's order (ring or tree), not f64 in
//! rank order. NCCL gives every rank the same bits of an all-reduce (each chunk is reduced once and
//! then copied to every rank), so the ranks still take identical updates; a rerun repeats them when
//! NCCL picks the same algorithm (same machines, same `NCCL_ALGO`).
//!
//! The price of the overlap: one more buffer per gradient (the sums are out of place) until the
//! update, as DDP's bucket buffers.

use super::buckets::{self, Schedule, BUCKET_VALUES};
use super::Collective;
use crate::autograd::{ParamId, ParamStore};
use crate::cuda::{self, Gpu};
use crate::tensor::{DType, Device, Tensor};
use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

/// The file names NCCL ships as (`libnccl.so.2` is its SONAME; pip's `nvidia-nccl-cu13` and
/// Debian's `libnccl2` ship only that one; `libnccl-dev` adds the bare name).
pub const NCCL_FILES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// The NCCL library podgpu would load: the first of `NCCL_FILES` in the CUDA search folders
/// (`PODGPU_CUDA_LIBS`, `LD_LIBRARY_PATH`, pip's `nvidia/*/lib`, the system folders).
pub fn find_library() -> Option<PathBuf> {
    cuda::libs::search::search_dirs()
        .iter()
        .find_map(|d| NCCL_FILES.iter().map(|n| d.join(n)).find(|p| p.is_file()))
}

/// Whether cudarc can open NCCL by one of the names it tries (never panics).
pub fn library_present() -> bool {
    // SAFETY: only tries `dlopen` on a list of names and closes the handle again.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// NCCL ready for cudarc, or why not and what to do. cudarc asks for `libnccl.so` (and CUDA-style
/// names), never NCCL's SONAME `libnccl.so.2`: podgpu's executables restart themselves with a
/// link of that name first on `LD_LIBRARY_PATH` (`cuda::libs::reexec_with_chosen_libraries`);
/// other programs (the test executables) need it set before they start.
pub fn ensure_library() -> Result<(), String> {
    cuda::libs::ensure_loaded();
    if library_present() {
        return Ok(());
    }
    match find_library() {
        None => Err(format!(
            "NCCL (libnccl.so.2) was not found in any CUDA library folder ({}): install it \
             (`pip install nvidia-nccl-cu13`, or Debian's libnccl2) or point PODGPU_CUDA_LIBS at \
             its folder",
            cuda::libs::search::search_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(f) => {
            let link = cuda::libs::nccl_link_folder(&f)
                .map(|d| d.display().to_string())
                .unwrap_or_else(|e| format!("(a folder with a link libnccl.so → it: {e})"));
            Err(format!(
                "NCCL is at {} but cudarc opens it only as libnccl.so, which the loader does not \
                 find: start the program with `LD_LIBRARY_PATH={link}:$LD_LIBRARY_PATH` (podgpu \
                 itself restarts that way)",
                f.display()
            ))
        }
    }
}

/// This rank's NCCL communicator, on its GPU, with its side stream.
pub struct DeviceGroup {
    comm: Comm,
    gpu: Arc<Gpu>,
    side: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

/// Set to `0` (on rank 0; `mpirun -x PODGPU_NCCL=0`): GPU ranks combine through the host, as
/// without NCCL (to compare the two paths, or to work around a broken NCCL set-up).
pub const NCCL_ENV: &str = "PODGPU_NCCL";

/// What `DeviceGroup::join` gives every rank.
pub enum Joined {
    /// This rank's communicator.
    Group(DeviceGroup),
    /// Rank 0 could not make NCCL's unique id (NCCL missing, or `PODGPU_NCCL=0`): no rank uses
    /// NCCL, every rank combines through the host. Rank 0's reason; the others' is a placeholder.
    Unavailable(String),
}

impl DeviceGroup {
    /// Every rank of `c` opens its communicator on `device` (each rank its own GPU). Collective:
    /// every rank calls it. Rank 0 decides whether NCCL is used (`Joined::Unavailable` on every
    /// rank when it cannot make the unique id). `Err` is this rank's own failure after rank 0
    /// sent the id (no NCCL here, NCCL's init failed): the others may be waiting in the init, so
    /// the caller stops the job (`Collective::abort`).
    pub fn join(c: &dyn Collective, device: Device) -> Result<Joined, String> {
        let Device::Cuda(ordinal) = device else {
            return Err(format!("NCCL needs a GPU rank; this rank runs on {device}"));
        };
        // Rank 0's id, or an empty message when it could not make one.
        let mut msg = Vec::new();
        let mut own_error = String::from("rank 0 could not use NCCL");
        if c.rank() == 0 {
            let id = match std::env::var(NCCL_ENV).as_deref() {
                Ok("0") => Err(format!("{NCCL_ENV}=0")),
                _ => ensure_library().and_then(|()| {
                    Id::new().map_err(|e| format!("NCCL could not make a unique id: {e:?}"))
                }),
            };
            match id {
                Ok(id) => msg = id.internal().iter().map(|&b| b as u8).collect(),
                Err(e) => own_error = e,
            }
        }
        c.broadcast_bytes(&mut msg)
            .map_err(|e| format!("sending NCCL's unique id: {e}"))?;
        if msg.is_empty() {
            return Ok(Joined::Unavailable(own_error));
        }
        let internal: [std::ffi::c_char; 128] = msg
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                format!(
                    "rank 0 could not create NCCL's unique id (got {} bytes, not 128)",
                    msg.len()
                )
            })?;
        ensure_library()?;
        let gpu = Gpu::get(ordinal)?;
        let side = gpu
            .ctx
            .new_stream()
            .map_err(|e| format!("a side stream on cuda:{ordinal}: {e}"))?;
        let comm = Comm::from_rank(side.clone(), c.rank(), c.size(), Id::uninit(internal))
            .map_err(|e| {
                format!(
                    "NCCL's init of rank {} of {} on cuda:{ordinal} failed: {e:?} \
                     (NCCL_DEBUG=INFO says why)",
                    c.rank(),
                    c.size()
                )
            })?;
        Ok(Joined::Group(DeviceGroup {
            comm,
            gpu,
            side,
            rank: c.rank(),
            size: c.size(),
        }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Sums `v` (a GPU tensor on this group's device, f32) across ranks in place, on the side
    /// stream, ordered after the compute stream's work and before its later work.
    pub fn all_reduce_sum(&self, v: &mut Tensor) -> Result<(), String> {
        self.all_reduce_tensors(&mut [v])
    }

    /// Replaces every trainable gradient in `store` with the global batch's, given that this
    /// rank's gradients are those of its mean loss over `batch` of the global batch's `total`
    /// images. A rank with no images (`batch` 0) sends zeros and still takes part. The sums of a
    /// step whose backward pass is over (`overlap` + `Overlap::finish` at once).
    pub fn combine_gradients(
        self: &Rc<Self>,
        store: &mut ParamStore,
        batch: usize,
        total: usize,
    ) -> Result<(), String> {
        self.overlap(store, batch).finish(store, total)
    }

    /// The sums of one step's gradients, to be started bucket by bucket while the backward pass
    /// runs (`Overlap::grad_ready`, from `Tape::backward_then`) and finished after the vote.
    pub fn overlap(self: &Rc<Self>, store: &ParamStore, batch: usize) -> Overlap {
        self.overlap_in_buckets(store, batch, BUCKET_VALUES)
    }

    /// `overlap` with buckets of at most `bucket_values` values (tests: several buckets in a
    /// small network).
    pub fn overlap_in_buckets(
        self: &Rc<Self>,
        store: &ParamStore,
        batch: usize,
        bucket_values: usize,
    ) -> Overlap {
        let plan = buckets::plan(store, bucket_values);
        Overlap {
            group: self.clone(),
            schedule: Schedule::new(&plan),
            plan,
            batch,
            sums: Vec::new(),
            error: None,
        }
    }

    /// One NCCL group summing each `send` into its `recv` (out of place: this rank's gradients stay
    /// as they were, for its finite check), on the side stream after the compute stream's work so
    /// far. The compute stream does not wait here: `Overlap::finish` joins it once.
    fn all_reduce_into(&self, pairs: &mut [(&Tensor, &mut Tensor)]) -> Result<(), String> {
        self.in_group(pairs.iter_mut().map(|(send, recv)| {
            let n = send.numel();
            let src = cuda::buf(send).raw().slice(0..n);
            let mut dst = cuda::buf_mut(recv).raw_mut().slice_mut(0..n);
            self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
        }))
    }

    /// One NCCL group summing `ts` in place; the compute stream then waits for the side stream.
    fn all_reduce_tensors(&self, ts: &mut [&mut Tensor]) -> Result<(), String> {
        self.in_group(ts.iter_mut().map(|t| {
            let b = cuda::buf_mut(t);
            let n = b.len();
            let mut view = b.raw_mut().slice_mut(0..n);
            self.comm.all_reduce_in_place(&mut view, &ReduceOp::Sum)
        }))?;
        self.gpu
            .stream
            .join(&self.side)
            .map_err(|e| format!("NCCL stream wait on rank {}: {e}", self.rank))
    }

    /// Runs the NCCL `calls` (consumed in order, each issuing one collective) as one group on the
    /// side stream, after the compute stream's work so far. The group is closed even after a
    /// failed call, so NCCL is not left inside it.
    fn in_group<E: std::fmt::Debug, R>(
        &self,
        calls: impl Iterator<Item = Result<R, E>>,
    ) -> Result<(), String> {
        let fail = |what: &str, e: String| format!("NCCL {what} on rank {}: {e}", self.rank);
        self.side
            .join(&self.gpu.stream)
            .map_err(|e| fail("stream wait", e.to_string()))?;
        cudarc::nccl::group_start().map_err(|e| fail("group start", format!("{e:?}")))?;
        let mut result = Ok(());
        for call in calls {
            if let Err(e) = call {
                result = Err(fail("all-reduce", format!("{e:?}")));
                break;
            }
        }
        let end = cudarc::nccl::group_end().map_err(|e| fail("group end", format!("{e:?}")));
        result.and(end.map(|_| ()))
    }
}

/// One step's gradient sums across ranks, started while the backward pass runs.
///
/// As the backward pass finishes each parameter (`grad_ready`), the buckets whose gradients are
/// all final go to NCCL in plan order (`dist::buckets`): this rank's b_r·g_r (its mean gradient
/// times its images) is summed out of place into a fresh buffer on the side stream, so NCCL's
/// kernels run beside the rest of the backward pass and this rank's own gradients stay as they
/// were for its finite check and the vote. `finish` (after the vote, which gives the global batch
/// B) sends what is left, makes the compute stream wait for the side stream once, and sets every
/// trainable gradient to Σ_r b_r·g_r / B. Dropped without `finish` (a stop after the vote), it
/// still makes the compute stream wait for NCCL, so no buffer NCCL reads goes back to the pool
/// while it is in use.
pub struct Overlap {
    group: Rc<DeviceGroup>,
    plan: Vec<Vec<usize>>,
    schedule: Schedule,
    batch: usize,
    /// (parameter index, this rank's b_r·g_r, the sum) of every launched bucket, kept alive until
    /// the compute stream has waited for NCCL.
    sums: Vec<(usize, Tensor, Tensor)>,
    /// The first failure (reported by `finish`: the backward pass cannot stop in a callback).
    error: Option<String>,
}

impl Overlap {
    /// Parameter `id`'s gradient is final (`Tape::backward_then`): launches the buckets this
    /// completes.
    pub fn grad_ready(&mut self, store: &ParamStore, id: ParamId) {
        for b in self.schedule.ready(id.0) {
            self.launch(store, b);
        }
    }

    fn launch(&mut self, store: &ParamStore, bucket: usize) {
        if self.error.is_some() {
            return;
        }
        let g = &self.group;
        let device = Device::Cuda(g.gpu.ordinal);
        let mut launched = Vec::with_capacity(self.plan[bucket].len());
        for &i in &self.plan[bucket] {
            let p = store.get(ParamId(i));
            let send = match &p.grad {
                Some(grad) if self.batch > 0 => {
                    if grad.device() != device || grad.dtype() != DType::F32 {
                        self.error = Some(format!(
                            "the gradient of {} is {:?} on {}; NCCL sums f32 gradients on {device}",
                            p.name,
                            grad.dtype(),
                            grad.device()
                        ));
                        return;
                    }
                    crate::ops::scale_fwd(grad, self.batch as f64)
                }
                _ => cuda::tensor(p.value.shape(), g.gpu.alloc_zeros(p.value.numel())),
            };
            let recv = cuda::tensor(p.value.shape(), g.gpu.alloc(p.value.numel()));
            launched.push((i, send, recv));
        }
        let mut pairs: Vec<(&Tensor, &mut Tensor)> =
            launched.iter_mut().map(|(_, s, r)| (&*s, r)).collect();
        if let Err(e) = g.all_reduce_into(&mut pairs) {
            self.error = Some(e);
        }
        self.sums.extend(launched);
    }

    /// After the vote: the rest of the buckets, then every trainable gradient in `store` replaced
    /// by the global batch's (`total` images).
    pub fn finish(mut self, store: &mut ParamStore, total: usize) -> Result<(), String> {
        for b in self.schedule.rest() {
            self.launch(store, b);
        }
        self.wait_for_nccl()?;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if total == 0 {
            return Ok(());
        }
        for (i, _, sum) in std::mem::take(&mut self.sums) {
            store.get_mut(ParamId(i)).grad = Some(crate::ops::scale_fwd(&sum, 1.0 / total as f64));
        }
        Ok(())
    }

    /// The compute stream waits for everything launched on the side stream.
    fn wait_for_nccl(&self) -> Result<(), String> {
        let g = &self.group;
        g.gpu
            .stream
            .join(&g.side)
            .map_err(|e| format!("NCCL stream wait on rank {}: {e}", g.rank))
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        if !self.sums.is_empty() {
            let _ = self.wait_for_nccl();
        }
    }
}
