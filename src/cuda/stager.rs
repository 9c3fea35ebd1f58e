//! Batch uploads that overlap with compute (issue 12 item 5): the next batch goes to the GPU on a
//! copy stream from page-locked memory while the current step's kernels run.
//!
//! Every other piece of podgpu uses one stream, and the pool's reuse of blocks relies on that
//! order. So the copy stream never writes into pool memory: it writes into the stager's own two
//! device slots, and the compute stream then copies a slot into a fresh pool buffer (a device to
//! device copy, ~2 TB/s: microseconds for a CIFAR batch) after waiting for the slot's copy event.
//! Slots alternate; before a slot is reused the copy stream waits for the compute stream's copy
//! out of it (an event), and the host waits for the slot's previous upload to have left its
//! page-locked memory (an event two uploads old: normally long done). Neither waits for kernels.
//!
//! Used by the trainer on a GPU when `PODGPU_COPY_STREAM=1` (opt-in until a GPU run measures it;
//! uploads are otherwise `Tensor::to_device`).

use super::pinned::PinnedWords;
use super::{tensor, CudaBuf, Gpu};
use crate::tensor::Tensor;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DriverError};
use std::sync::Arc;

struct Slot {
    host: PinnedWords,
    dev: CudaSlice<f32>,
    /// Recorded on the copy stream after the upload into `dev`.
    copied: CudaEvent,
    /// Recorded on the compute stream after the copy out of `dev`.
    consumed: CudaEvent,
    used: bool,
}

/// Two slots of `capacity` words each, and the copy stream.
pub struct InputStager {
    gpu: Arc<Gpu>,
    copy: Arc<CudaStream>,
    slots: Vec<Slot>,
    next: usize,
    capacity: usize,
}

impl InputStager {
    /// A stager for uploads of up to `capacity` f32 words.
    pub fn new(gpu: &Arc<Gpu>, capacity: usize) -> Result<InputStager, String> {
        let e = |e: DriverError| format!("cuda:{}: input stager: {e}", gpu.ordinal);
        let copy = gpu.ctx.new_stream().map_err(e)?;
        let capacity = capacity.max(1);
        let mut slots = Vec::new();
        for _ in 0..2 {
            // SAFETY: device memory owned by the slot; written by uploads before any read.
            let dev = unsafe { gpu.stream.alloc::<f32>(capacity) }.map_err(e)?;
            slots.push(Slot {
                host: PinnedWords::zeroed(&gpu.ctx, capacity).map_err(e)?,
                dev,
                copied: gpu.ctx.new_event(None).map_err(e)?,
                consumed: gpu.ctx.new_event(None).map_err(e)?,
                used: false,
            });
        }
        // The slots' memory comes from a stream-ordered allocation: let it complete before the
        // copy stream writes there.
        gpu.stream.synchronize().map_err(e)?;
        Ok(InputStager {
            gpu: gpu.clone(),
            copy,
            slots,
            next: 0,
            capacity,
        })
    }

    /// The words of `data` in a fresh GPU tensor of `shape`, uploaded on the copy stream; the
    /// compute stream waits for that copy only where the tensor is first used.
    pub fn upload(&mut self, shape: &[usize], data: &[f32]) -> Result<Tensor, String> {
        let n = data.len();
        assert_eq!(
            crate::tensor::numel(shape),
            n,
            "stager: shape {shape:?} for {n} words"
        );
        if n > self.capacity {
            return Err(format!(
                "stager: {n} words do not fit its {} (made for a smaller batch)",
                self.capacity
            ));
        }
        let ord = self.gpu.ordinal;
        let e = |e: DriverError| format!("cuda:{ord}: input stager: {e}");
        let slot = &mut self.slots[self.next];
        self.next = (self.next + 1) % 2;
        if slot.used {
            // The page-locked words are free once their last upload has run (two uploads ago).
            slot.copied.synchronize().map_err(e)?;
            // The device slot is free once the compute stream has copied it out.
            self.copy.wait(&slot.consumed).map_err(e)?;
        }
        slot.host.as_mut_slice()[..n].copy_from_slice(data);
        slot.host
            .copy_prefix_to(n, &mut slot.dev, &self.copy)
            .map_err(e)?;
        slot.copied.record(&self.copy).map_err(e)?;
        slot.used = true;
        self.gpu.stream.wait(&slot.copied).map_err(e)?;
        let mut out: CudaBuf = self.gpu.alloc(n);
        if n > 0 {
            let from = slot.dev.slice(0..n);
            let mut to = out.raw_mut().slice_mut(0..n);
            self.gpu.stream.memcpy_dtod(&from, &mut to).map_err(e)?;
        }
        slot.consumed.record(&self.gpu.stream).map_err(e)?;
        Ok(tensor(shape, out))
    }
}

impl Drop for InputStager {
    fn drop(&mut self) {
        // Copies may still read the page-locked words or write the slots.
        let _ = self.copy.synchronize();
        let _ = self.gpu.stream.synchronize();
    }
}

/// Whether the trainer uploads batches through an `InputStager` (`PODGPU_COPY_STREAM=1`).
pub fn wanted() -> Result<bool, String> {
    match std::env::var("PODGPU_COPY_STREAM").ok().as_deref() {
        None | Some("") | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(format!(
            "PODGPU_COPY_STREAM={other:?}: expected 1 (upload batches on a copy stream) or 0"
        )),
    }
}
