//! The `cuda-peer` transport: one process drives every GPU of a node, one thread per
//! rank, and row segments move straight from a sender's buffer into the receiver's
//! buffer with the copy engines (`cuMemcpyPeerAsync`; a device-to-device copy when
//! both ranks share a GPU).
//!
//! Control messages (receive addresses, the completion barrier) travel through the
//! in-process mailbox of the `local` transport: the counts are already on the host
//! after the layout, so a host message is cheaper than a device copy plus a
//! synchronisation, and it carries the same failure and timeout semantics.
//!
//! The push protocol of one all-to-all-v:
//! 1. every rank tells each source where in its receive buffers (one per plane)
//!    that source's rows go, together with the words of the pairing check, so one
//!    message both checks the call and places the rows;
//! 2. every rank starts its copies, one stream per destination, so copies to
//!    different peers are in flight at once; the local segment is a copy on the
//!    device, never crossing a link;
//! 3. every rank waits for its own copies (one host wait: the first stream waits on
//!    the others' events), then meets the others at a barrier: after it, every
//!    receive buffer is complete and no send buffer is still being read.
//!
//! The caller guarantees that the send buffer is written and the receive buffer
//! allocated (its stream synchronised) before the call.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{result, sys};
use ep_core::{counters, EpError, EpResult};

use crate::device_exchange::{
    check_counts, open_call, spans_per_rank, DeviceExchange, Pairing, Plane, Span,
};
use crate::local::{local_comms, run_threads, LocalComm};

/// A raw CUDA handle that may cross threads: contexts and streams are usable from
/// any thread once made current.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Raw<T>(pub(crate) T);
unsafe impl<T> Send for Raw<T> {}
unsafe impl<T> Sync for Raw<T> {}

/// One rank's end of the cuda-peer transport.
pub struct CudaPeerComm {
    control: Arc<LocalComm>,
    /// CUDA ordinal of every rank's device.
    devices: Arc<Vec<usize>>,
    /// Primary context of every CUDA ordinal in use (indexed by ordinal).
    contexts: Arc<Vec<Option<Raw<sys::CUcontext>>>>,
    /// One stream per destination rank, on this rank's device.
    streams: Vec<Raw<sys::CUstream>>,
    /// One event per stream: the first stream waits on the others' copies, so the
    /// host waits once.
    events: Vec<Raw<sys::CUevent>>,
}

/// A failed driver call, named.
pub(crate) fn driver(what: &str, e: impl std::fmt::Debug) -> EpError {
    EpError::Transport(format!("CUDA driver call {what} failed: {e:?}"))
}

/// The primary context of CUDA device `ordinal`: the one CubeCL's CUDA runtime uses.
pub(crate) fn primary_context(ordinal: usize) -> EpResult<sys::CUcontext> {
    let dev = result::device::get(ordinal as i32).map_err(|e| driver("cuDeviceGet", e))?;
    unsafe { result::primary_ctx::retain(dev) }.map_err(|e| driver("cuDevicePrimaryCtxRetain", e))
}

/// Lets the current context reach `peer`'s memory; enabling twice is not an error.
pub(crate) fn enable_context_access(peer: sys::CUcontext) -> EpResult<()> {
    match unsafe { sys::cuCtxEnablePeerAccess(peer, 0) } {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
            Ok(())
        }
        e => Err(driver("cuCtxEnablePeerAccess", e)),
    }
}

/// The number of CUDA devices this process sees.
pub fn cuda_device_count() -> EpResult<usize> {
    result::init().map_err(|e| driver("cuInit", e))?;
    result::device::get_count()
        .map(|n| n as usize)
        .map_err(|e| driver("cuDeviceGetCount", e))
}

/// Makes the ends of a cuda-peer transport for `world_size` ranks over the first
/// `devices` CUDA devices: rank `r` drives device `r % devices` (ranks share devices
/// round-robin when there are more ranks than devices). Enables peer access between
/// every pair of devices in use, and fails with [`EpError::NoPeerAccess`] where the
/// hardware has none.
pub fn cuda_peer_comms(
    world_size: usize,
    devices: usize,
    timeout: Duration,
) -> EpResult<Vec<CudaPeerComm>> {
    let available = cuda_device_count()?;
    if devices == 0 || devices > available {
        return Err(EpError::InvalidConfig(format!(
            "cuda-peer: asked for {devices} devices, this process sees {available}"
        )));
    }
    let used = devices.min(world_size);
    cuda_peer_comms_on((0..world_size).map(|r| r % used).collect(), timeout)
}

/// Makes the ends of a cuda-peer transport whose rank `i` drives CUDA device
/// `devices[i]`: one process's share of a hierarchical group, or a whole group.
pub fn cuda_peer_comms_on(devices: Vec<usize>, timeout: Duration) -> EpResult<Vec<CudaPeerComm>> {
    let available = cuda_device_count()?;
    if let Some(&bad) = devices.iter().find(|&&d| d >= available) {
        return Err(EpError::InvalidConfig(format!(
            "cuda-peer: device {bad} asked for, this process sees {available}"
        )));
    }
    let mut used = devices.clone();
    used.sort_unstable();
    used.dedup();
    let mut contexts = vec![None; available];
    for &ordinal in &used {
        contexts[ordinal] = Some(Raw(primary_context(ordinal)?));
    }
    enable_peer_access(&contexts, &used)?;

    let world_size = devices.len();
    let rank_devices = Arc::new(devices);
    let contexts = Arc::new(contexts);
    local_comms(world_size, timeout)
        .into_iter()
        .map(|control| {
            let ordinal = rank_devices[control.rank()];
            set_current(&contexts, ordinal)?;
            let streams = (0..world_size)
                .map(|_| {
                    result::stream::create(result::stream::StreamKind::NonBlocking)
                        .map(Raw)
                        .map_err(|e| driver("cuStreamCreate", e))
                })
                .collect::<EpResult<_>>()?;
            let events = (0..world_size)
                .map(|_| {
                    result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                        .map(Raw)
                        .map_err(|e| driver("cuEventCreate", e))
                })
                .collect::<EpResult<_>>()?;
            Ok(CudaPeerComm {
                control: Arc::new(control),
                devices: rank_devices.clone(),
                contexts: contexts.clone(),
                streams,
                events,
            })
        })
        .collect()
}

/// Whether CUDA device `from` can reach the memory of device `to`.
pub fn can_access_peer(from: usize, to: usize) -> EpResult<bool> {
    let dev = |d: usize| result::device::get(d as i32).map_err(|e| driver("cuDeviceGet", e));
    let mut can = 0;
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, dev(from)?, dev(to)?) }
        .result()
        .map_err(|e| driver("cuDeviceCanAccessPeer", e))?;
    Ok(can != 0)
}

/// Runs `work` on `world_size` ranks of a cuda-peer transport over every CUDA device
/// of the process (one thread per rank; see [`cuda_peer_comms`]) and returns each
/// rank's result in rank order. A rank that panics yields [`EpError::PeerFailed`].
pub fn run_cuda_peer<R, F>(
    world_size: usize,
    timeout: Duration,
    work: F,
) -> EpResult<Vec<EpResult<R>>>
where
    R: Send,
    F: Fn(CudaPeerComm) -> EpResult<R> + Sync,
{
    let comms = cuda_peer_comms(world_size, cuda_device_count()?, timeout)?;
    let departure = |comm: &CudaPeerComm| Some(comm.control().departure());
    Ok(run_threads(comms, CudaPeerComm::rank, departure, |comm| {
        set_current(&comm.contexts, comm.device())?;
        work(comm)
    }))
}

fn set_current(contexts: &[Option<Raw<sys::CUcontext>>], ordinal: usize) -> EpResult<()> {
    let ctx = contexts[ordinal].expect("contexts of devices in use are retained");
    unsafe { result::ctx::set_current(ctx.0) }.map_err(|e| driver("cuCtxSetCurrent", e))
}

/// Peer access between every ordered pair of the `used` devices: the contexts
/// (for `cuMemcpyPeerAsync`) and the stream-ordered memory pools CubeCL allocates
/// from (`cuMemPoolSetAccess`).
fn enable_peer_access(contexts: &[Option<Raw<sys::CUcontext>>], used: &[usize]) -> EpResult<()> {
    for &from in used {
        for &to in used.iter().filter(|&&to| to != from) {
            if !can_access_peer(from, to)? {
                return Err(EpError::NoPeerAccess { from, to });
            }
            set_current(contexts, from)?;
            enable_context_access(contexts[to].expect("retained").0)?;
            // Memory of `to`'s pool becomes readable and writable from `from`.
            let dev_to = result::device::get(to as i32).map_err(|e| driver("cuDeviceGet", e))?;
            let pool = unsafe { result::device::get_mem_pool(dev_to) }
                .map_err(|e| driver("cuDeviceGetMemPool", e))?;
            let access = sys::CUmemAccessDesc {
                location: sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: from as i32,
                },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            unsafe { sys::cuMemPoolSetAccess(pool, &access, 1) }
                .result()
                .map_err(|e| driver("cuMemPoolSetAccess", e))?;
        }
    }
    Ok(())
}

impl CudaPeerComm {
    pub fn rank(&self) -> usize {
        self.control.rank()
    }

    pub fn world_size(&self) -> usize {
        self.control.world_size()
    }

    /// The CUDA ordinal this rank drives.
    pub fn device(&self) -> usize {
        self.devices[self.rank()]
    }

    /// The CUDA ordinal of every rank.
    pub fn devices(&self) -> &[usize] {
        &self.devices
    }

    /// The host-side control channel (count exchange, barriers, small messages).
    pub fn control(&self) -> &Arc<LocalComm> {
        &self.control
    }

    fn copy(&self, dest: usize, to: u64, from: u64, bytes: usize) -> EpResult<()> {
        let stream = self.streams[dest].0;
        let (src_dev, dst_dev) = (self.device(), self.devices[dest]);
        unsafe {
            if src_dev == dst_dev {
                result::memcpy_dtod_async(to, from, bytes, stream)
                    .map_err(|e| driver("cuMemcpyDtoDAsync", e))
            } else {
                let ctx = |d: usize| self.contexts[d].expect("retained").0;
                result::memcpy_peer_async(ctx(dst_dev), to, ctx(src_dev), from, bytes, stream)
                    .map_err(|e| driver("cuMemcpyPeerAsync", e))
            }
        }
    }

    /// Waits for every copy this rank started: the first stream waits on the
    /// others' events, and the host on the first stream. Should an event call
    /// fail, the host waits on every stream instead: no buffer may be released
    /// under a running copy.
    fn wait_copies(&self) -> EpResult<()> {
        let first = self.streams[0].0;
        let chained =
            self.streams
                .iter()
                .zip(&self.events)
                .skip(1)
                .try_for_each(|(stream, event)| unsafe {
                    result::event::record(event.0, stream.0)
                        .map_err(|e| driver("cuEventRecord", e))?;
                    result::stream::wait_event(
                        first,
                        event.0,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .map_err(|e| driver("cuStreamWaitEvent", e))
                });
        let waited: &[Raw<sys::CUstream>] = match chained {
            Ok(()) => &self.streams[..1],
            Err(_) => &self.streams,
        };
        let mut finished = chained;
        for stream in waited {
            counters::host_sync();
            let synced = unsafe { result::stream::synchronize(stream.0) }
                .map_err(|e| driver("cuStreamSynchronize", e));
            finished = finished.and(synced);
        }
        finished
    }
}

impl CudaPeerComm {
    /// Moves one span per plane to every rank of this transport and receives one
    /// from each: `send[d]` is what goes to rank `d`, `recv[s]` where rank `s`'s
    /// bytes land (a zero length needs no valid address). With `pairing`, the
    /// landing message carries its words and each peer's are checked before any
    /// copy starts.
    pub(crate) fn exchange_spans(
        &self,
        send: &[Vec<Span>],
        recv: &[Vec<Span>],
        pairing: Option<&dyn Pairing>,
    ) -> EpResult<()> {
        let (me, world) = (self.rank(), self.world_size());
        // What each source is told: where in each plane its bytes land, and how many.
        let landings: Vec<Vec<u64>> = recv
            .iter()
            .map(|spans| {
                spans
                    .iter()
                    .flat_map(|&(at, bytes)| [at, bytes as u64])
                    .collect()
            })
            .collect();
        let landings: Vec<Vec<u64>> = match pairing {
            Some(pairing) => open_call(self.control.as_ref(), pairing, landings),
            None => {
                counters::control_message();
                self.control.all_to_all(landings)
            }
        }?;

        set_current(&self.contexts, self.device())?;
        let started = (|| {
            for (dest, (landing, spans)) in landings.iter().zip(send).enumerate() {
                for (to, &(from, bytes)) in landing.chunks_exact(2).zip(spans) {
                    let (to, expected) = (to[0], to[1] as usize);
                    if expected != bytes {
                        return Err(EpError::Transport(format!(
                            "rank {me} sends {bytes} bytes to rank {dest}, which expects \
                             {expected}"
                        )));
                    }
                    if bytes > 0 {
                        self.copy(dest, to, from, bytes)?;
                    }
                }
            }
            Ok(())
        })();
        // Wait for whatever was started even after an error: the buffers must not be
        // released under a running copy.
        let finished = self.wait_copies();
        // Every rank meets here, on success or failure alike, so no peer waits for a
        // barrier that never comes.
        counters::control_message();
        let status: Vec<Result<(), String>> =
            self.control.all_to_all(vec![
                started
                    .clone()
                    .and(finished.clone())
                    .map_err(|e| e.to_string());
                world
            ])?;
        started?;
        finished?;
        if let Some((rank, reason)) = status
            .into_iter()
            .enumerate()
            .find_map(|(rank, s)| s.err().map(|reason| (rank, reason)))
        {
            return Err(EpError::PeerFailed { rank, reason });
        }
        Ok(())
    }
}

impl DeviceExchange for CudaPeerComm {
    /// Addresses are device pointers on this rank's device.
    fn all_to_all_v(
        &self,
        planes: &[Plane],
        send_counts: &[usize],
        recv_counts: &[usize],
        pairing: &dyn Pairing,
    ) -> EpResult<()> {
        check_counts(self.rank(), self.world_size(), send_counts, recv_counts)?;
        self.exchange_spans(
            &spans_per_rank(planes, send_counts, |p| p.send),
            &spans_per_rank(planes, recv_counts, |p| p.recv),
            Some(pairing),
        )
    }
}

impl Drop for CudaPeerComm {
    fn drop(&mut self) {
        if set_current(&self.contexts, self.device()).is_ok() {
            for stream in &self.streams {
                // Nothing is queued: every call waits for its copies before returning.
                let _ = unsafe { result::stream::destroy(stream.0) };
            }
            for event in &self.events {
                let _ = unsafe { result::event::destroy(event.0) };
            }
        }
    }
}
