//! GPU ranks' gradients summed on the devices by NCCL (cargo feature `nccl`, which `distributed`
//! includes): Horovod's design, MPI (or any `Collective`) only carries NCCL's unique id.
//!
//! - `DeviceGroup::join`: rank 0 asks NCCL for a unique id, sends its 128 bytes to the others over
//!   the `Collective` (`broadcast_bytes`), and every rank opens its communicator on its own GPU
//!   (`ncclCommInitRank`) with a side stream of its own. One rank alone (`Single`) is NCCL's own
//!   single-process init: the smoke test on a one-GPU machine, no MPI needed.
//! - `DeviceGroup::combine_gradients`: each rank scales its mean gradient by b_r / B (its share of
//!   the global batch, known from the vote) on its compute stream, then the side stream waits for
//!   it and sums every trainable gradient across ranks (`ncclAllReduce`, f32, in place), in the
//!   buckets and order of `grads` (reverse parameter order, ≤ `grads::BUCKET_VALUES` values), each
//!   bucket one NCCL group; the compute stream waits for the side stream before the update. Σ_r
//!   (b_r/B)·g_r is the global batch's gradient, as `grads` computes it on the host.
//!
//! What differs from the host path: the sums are f32 in NCCL's order (ring or tree), not f64 in
//! rank order. NCCL gives every rank the same bits of an all-reduce (each chunk is reduced once and
//! then copied to every rank), so the ranks still take identical updates; a rerun repeats them when
//! NCCL picks the same algorithm (same machines, same `NCCL_ALGO`).
//!
//! No overlap with the backward pass yet: the sums start after backward and the vote (which needs
//! every rank's finite check), so the side stream only keeps NCCL's kernels off the compute stream.

use super::{grads::BUCKET_VALUES, Collective};
use crate::autograd::{ParamKind, ParamStore};
use crate::cuda::{self, Gpu};
use crate::tensor::{DType, Device, Tensor};
use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::path::PathBuf;
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
    /// images. A rank with no images (`batch` 0) sends zeros and still takes part.
    pub fn combine_gradients(
        &self,
        store: &mut ParamStore,
        batch: usize,
        total: usize,
    ) -> Result<(), String> {
        if total == 0 {
            return Ok(());
        }
        let share = batch as f64 / total as f64;
        let device = Device::Cuda(self.gpu.ordinal);
        let mut ids: Vec<usize> = store
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == ParamKind::Trainable)
            .map(|(i, _)| i)
            .collect();
        ids.reverse();
        // This rank's share of each gradient, on the compute stream.
        let mut scaled: Vec<(usize, Tensor)> = Vec::with_capacity(ids.len());
        for &i in &ids {
            let p = store.iter().nth(i).expect("param");
            let g = match &p.grad {
                Some(g) if batch > 0 => {
                    if g.device() != device || g.dtype() != DType::F32 {
                        return Err(format!(
                            "the gradient of {} is {:?} on {}; NCCL sums f32 gradients on {device}",
                            p.name,
                            g.dtype(),
                            g.device()
                        ));
                    }
                    crate::ops::scale_fwd(g, share)
                }
                _ => cuda::tensor(p.value.shape(), self.gpu.alloc_zeros(p.value.numel())),
            };
            scaled.push((i, g));
        }
        // Buckets of whole tensors, at most BUCKET_VALUES values unless one tensor is larger.
        let mut start = 0;
        while start < scaled.len() {
            let mut end = start;
            let mut values = 0;
            while end < scaled.len() {
                let n = scaled[end].1.numel();
                if end > start && values + n > BUCKET_VALUES {
                    break;
                }
                values += n;
                end += 1;
            }
            let mut bucket: Vec<&mut Tensor> =
                scaled[start..end].iter_mut().map(|(_, t)| t).collect();
            self.all_reduce_tensors(&mut bucket)?;
            start = end;
        }
        for (i, g) in scaled {
            store.iter_mut().nth(i).expect("param").grad = Some(g);
        }
        Ok(())
    }

    /// One NCCL group summing `ts` in place: the side stream waits for the compute stream, the
    /// compute stream then waits for the side stream.
    fn all_reduce_tensors(&self, ts: &mut [&mut Tensor]) -> Result<(), String> {
        let fail = |what: &str, e: String| format!("NCCL {what} on rank {}: {e}", self.rank);
        self.side
            .join(&self.gpu.stream)
            .map_err(|e| fail("stream wait", e.to_string()))?;
        cudarc::nccl::group_start().map_err(|e| fail("group start", format!("{e:?}")))?;
        let mut result = Ok(());
        for t in ts.iter_mut() {
            let b = cuda::buf_mut(t);
            let n = b.len();
            let mut view = b.raw_mut().slice_mut(0..n);
            if let Err(e) = self.comm.all_reduce_in_place(&mut view, &ReduceOp::Sum) {
                result = Err(fail("all-reduce", format!("{e:?}")));
                break;
            }
        }
        // The group is closed even after a failed call, so NCCL is not left inside it.
        let end = cudarc::nccl::group_end().map_err(|e| fail("group end", format!("{e:?}")));
        result.and(end)?;
        self.gpu
            .stream
            .join(&self.side)
            .map_err(|e| fail("stream wait", e.to_string()))
    }
}
