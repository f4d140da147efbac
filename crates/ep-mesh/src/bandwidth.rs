//! The physical ceiling of the cuda-peer transport: copy bandwidth between two GPUs
//! (or within one), measured with the same driver calls the transport makes.

use std::time::Duration;

use cudarc::driver::{result, sys};
use ep_core::EpResult;

use crate::cuda_peer::{driver, enable_context_access, primary_context};

/// What a copy measurement found.
#[derive(Debug, Clone, Copy)]
pub struct CopyBandwidth {
    pub bytes: usize,
    /// Median time of one copy.
    pub time: Duration,
    /// Bytes moved per second, in GB/s (10^9), counting each byte once.
    pub gbps: f64,
}

/// Copies `bytes` from a buffer on CUDA device `from` to one on `to`, `reps` times
/// after three warm-up copies, each timed with events on one stream; returns the
/// median. A peer copy (`cuMemcpyPeerAsync`) when the devices differ, a device copy
/// otherwise: what one segment of the cuda-peer transport costs at best.
pub fn copy_bandwidth(
    from: usize,
    to: usize,
    bytes: usize,
    reps: usize,
) -> EpResult<CopyBandwidth> {
    result::init().map_err(|e| driver("cuInit", e))?;
    let (src_ctx, dst_ctx) = (primary_context(from)?, primary_context(to)?);
    unsafe {
        result::ctx::set_current(dst_ctx).map_err(|e| driver("cuCtxSetCurrent", e))?;
        let dst = result::malloc_sync(bytes).map_err(|e| driver("cuMemAlloc", e))?;
        result::ctx::set_current(src_ctx).map_err(|e| driver("cuCtxSetCurrent", e))?;
        if from != to {
            enable_context_access(dst_ctx)?;
        }
        let src = result::malloc_sync(bytes).map_err(|e| driver("cuMemAlloc", e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver("cuStreamCreate", e))?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (start, end) = (
            result::event::create(flags).map_err(|e| driver("cuEventCreate", e))?,
            result::event::create(flags).map_err(|e| driver("cuEventCreate", e))?,
        );
        let copy = || {
            if from == to {
                result::memcpy_dtod_async(dst, src, bytes, stream)
            } else {
                result::memcpy_peer_async(dst_ctx, dst, src_ctx, src, bytes, stream)
            }
        };
        let mut times = Vec::with_capacity(reps);
        for i in 0..reps + 3 {
            result::event::record(start, stream).map_err(|e| driver("cuEventRecord", e))?;
            copy().map_err(|e| driver("copy", e))?;
            result::event::record(end, stream).map_err(|e| driver("cuEventRecord", e))?;
            result::event::synchronize(end).map_err(|e| driver("cuEventSynchronize", e))?;
            let ms =
                result::event::elapsed(start, end).map_err(|e| driver("cuEventElapsedTime", e))?;
            if i >= 3 {
                times.push(ms as f64 * 1e-3);
            }
        }
        let _ = result::event::destroy(start);
        let _ = result::event::destroy(end);
        let _ = result::stream::destroy(stream);
        let _ = result::free_sync(src);
        result::ctx::set_current(dst_ctx).map_err(|e| driver("cuCtxSetCurrent", e))?;
        let _ = result::free_sync(dst);
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[times.len() / 2];
        Ok(CopyBandwidth {
            bytes,
            time: Duration::from_secs_f64(median),
            gbps: bytes as f64 / median / 1e9,
        })
    }
}
