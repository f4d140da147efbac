//! The `cuda-peer` transport: one process drives every GPU of a node, one thread per
//! rank, and row segments move straight from a sender's buffer into the receiver's
//! buffer with the copy engines (`cuMemcpyPeerAsync`; a device-to-device copy when
//! both ranks share a GPU).
//!
//! Control messages (receive addresses, the closing barrier) travel through the
//! in-process mailbox of the `local` transport: the counts are already on the host
//! after the layout, so a host message is cheaper than a device copy plus a
//! synchronisation, and it carries the same failure and timeout semantics.
//!
//! The push protocol of one all-to-all-v, ordered on the device: the host never
//! waits for the GPU.
//! 1. every rank records its *ready* event on the caller's stream: past it, its
//!    send buffers are written and its receive buffers free;
//! 2. every rank tells each source where in its receive buffers (one per plane)
//!    that source's rows go, together with the words of the pairing check, so one
//!    message both checks the call and places the rows;
//! 3. every rank queues its copies, one stream per destination, so copies to
//!    different peers are in flight at once. Each destination's stream first waits
//!    for the sender's and the receiver's ready events, and records a *copied*
//!    event after its copies. The local segment is a copy on the device, never
//!    crossing a link;
//! 4. every rank meets the others at a barrier that carries each rank's status;
//!    after it, every copied event of the call is recorded;
//! 5. the caller's stream waits for the copies into this rank's buffers and for
//!    the copies out of them: work queued after the call sees the rows, and no
//!    buffer is released under a running copy.
//!
//! In a two-rank group on one GPU burn-ep's kernels skip the copies: the ranks
//! trade buffer addresses instead of rows, and each rank's kernels write or read
//! the peer's buffers themselves ([`DirectAccess`], the same events standing in
//! the caller's stream for the copy streams).
//!
//! The events are reused from call to call without a race: a rank records its
//! ready event for call N+1 only after the barrier of call N, by which time every
//! peer has queued its waits on it, and a copied event is recorded again only
//! after the opening message of call N+1, which its receiver sends after queuing
//! its waits of call N.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{result, sys};
use ep_core::{counters, EpError, EpResult};

use crate::device_exchange::{
    check_counts, open_call, spans_of_call, DeviceExchange, DirectAccess, Pairing, Plane, Span,
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
    /// The events of every rank, shared by the ranks of the transport.
    events: Arc<CallEvents>,
}

/// The events that order a call's copies on the device (see the module's
/// protocol): `ready[r]` is recorded on rank `r`'s stream, `copied[s][d]` on rank
/// `s`'s stream of copies to rank `d`; each is made on its rank's device.
struct CallEvents {
    ready: Vec<Raw<sys::CUevent>>,
    copied: Vec<Vec<Raw<sys::CUevent>>>,
}

impl CallEvents {
    /// The events of ranks driving `devices` (one entry per rank).
    fn new(devices: &[usize], contexts: &[Option<Raw<sys::CUcontext>>]) -> EpResult<Self> {
        let world = devices.len();
        let mut events = CallEvents {
            ready: Vec::with_capacity(world),
            copied: Vec::with_capacity(world),
        };
        // One event at a time into `events`, so that a failure part way drops (and
        // destroys) the ones already made.
        for &ordinal in devices {
            set_current(contexts, ordinal)?;
            events.ready.push(new_event()?);
            events.copied.push(Vec::with_capacity(world));
            for _ in 0..world {
                let event = new_event()?;
                events.copied.last_mut().expect("pushed above").push(event);
            }
        }
        Ok(events)
    }
}

impl Drop for CallEvents {
    fn drop(&mut self) {
        for event in self.ready.iter().chain(self.copied.iter().flatten()) {
            let _ = unsafe { result::event::destroy(event.0) };
        }
    }
}

fn new_event() -> EpResult<Raw<sys::CUevent>> {
    result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
        .map(Raw)
        .map_err(|e| driver("cuEventCreate", e))
}

/// Makes `waiter` wait, on the device, for the work queued on `stream` so far.
pub(crate) fn stream_waits_for(waiter: sys::CUstream, stream: sys::CUstream) -> EpResult<()> {
    let event = new_event()?;
    let ordered = record_then_wait(event.0, stream, waiter);
    // Destroying an event does not cancel a wait already queued on it.
    let _ = unsafe { result::event::destroy(event.0) };
    ordered
}

fn record_then_wait(
    event: sys::CUevent,
    stream: sys::CUstream,
    waiter: sys::CUstream,
) -> EpResult<()> {
    unsafe { result::event::record(event, stream) }.map_err(|e| driver("cuEventRecord", e))?;
    wait_on(waiter, event)
}

fn wait_on(stream: sys::CUstream, event: sys::CUevent) -> EpResult<()> {
    unsafe {
        result::stream::wait_event(
            stream,
            event,
            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
    }
    .map_err(|e| driver("cuStreamWaitEvent", e))
}

/// A failed driver call, named.
pub(crate) fn driver(what: &str, e: impl std::fmt::Debug) -> EpError {
    EpError::Transport(format!("CUDA driver call {what} failed: {e:?}"))
}

/// The primary context of CUDA device `ordinal`: the one CubeCL's CUDA runtime uses.
pub fn primary_context(ordinal: usize) -> EpResult<sys::CUcontext> {
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
    let events = Arc::new(CallEvents::new(&devices, &contexts)?);
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
            Ok(CudaPeerComm {
                control: Arc::new(control),
                devices: rank_devices.clone(),
                contexts: contexts.clone(),
                streams,
                events: events.clone(),
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

    /// How many lower ranks share this rank's device: ranks on one device run as
    /// separate servers ("lanes") of it, so that their launches need not take turns.
    pub fn lane(&self) -> usize {
        let device = self.device();
        self.devices[..self.rank()]
            .iter()
            .filter(|&&d| d == device)
            .count()
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

    /// Waits on the host for every copy this rank queued: the way out after a
    /// failed call, where the events may not all have been recorded and no buffer
    /// may be released under a running copy.
    fn drain_copies(&self) {
        for stream in &self.streams {
            counters::host_sync();
            let _ = unsafe { result::stream::synchronize(stream.0) };
        }
    }
}

impl CudaPeerComm {
    /// Moves one span per plane to every rank of this transport and receives one
    /// from each: `send[d]` is what goes to rank `d`, `recv[s]` where rank `s`'s
    /// bytes land (a zero length needs no valid address). With `pairing`, the
    /// landing message carries its words and each peer's are checked before any
    /// copy is queued. The copies are ordered on the device after the work queued
    /// on `stream`, and work queued on `stream` after the call is ordered after
    /// them (see the module's protocol).
    pub(crate) fn exchange_spans(
        &self,
        send: &[Vec<Span>],
        recv: &[Vec<Span>],
        pairing: Option<&dyn Pairing>,
        stream: u64,
    ) -> EpResult<()> {
        let (me, world) = (self.rank(), self.world_size());
        let stream = stream as sys::CUstream;
        let events = &self.events;
        set_current(&self.contexts, self.device())?;
        unsafe { result::event::record(events.ready[me].0, stream) }
            .map_err(|e| driver("cuEventRecord", e))?;
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

        let bytes_of = |spans: &Vec<Span>| spans.iter().map(|&(_, bytes)| bytes).sum::<usize>();
        let queued = (|| {
            for (dest, (landing, spans)) in landings.iter().zip(send).enumerate() {
                // Every destination's lengths are checked, those this rank sends
                // nothing to as well.
                for (to, &(_, bytes)) in landing.chunks_exact(2).zip(spans) {
                    let expected = to[1] as usize;
                    if expected != bytes {
                        return Err(EpError::Transport(format!(
                            "rank {me} sends {bytes} bytes to rank {dest}, which expects \
                             {expected}"
                        )));
                    }
                }
                if bytes_of(spans) == 0 {
                    continue;
                }
                let copies = self.streams[dest].0;
                wait_on(copies, events.ready[me].0)?;
                if dest != me {
                    wait_on(copies, events.ready[dest].0)?;
                }
                for (to, &(from, bytes)) in landing.chunks_exact(2).zip(spans) {
                    if bytes > 0 {
                        self.copy(dest, to[0], from, bytes)?;
                    }
                }
                unsafe { result::event::record(events.copied[me][dest].0, copies) }
                    .map_err(|e| driver("cuEventRecord", e))?;
            }
            Ok(())
        })();
        // The caller's stream waits for the bytes that left and the bytes that came.
        let sent = (0..world).filter(|&dest| bytes_of(&send[dest]) > 0);
        let came = (0..world).filter(|&source| source != me && bytes_of(&recv[source]) > 0);
        let waits = sent
            .map(|dest| events.copied[me][dest])
            .chain(came.map(|source| events.copied[source][me]));
        self.close_call(queued, waits, stream)
    }

    /// The end of every call: every rank meets the others with its status, on
    /// success or failure alike, so no peer waits for a barrier that never comes;
    /// then `stream` waits for `waits`, after a failure as well (an event a failed
    /// peer did not record this call is an earlier call's, already passed).
    fn close_call(
        &self,
        queued: EpResult<()>,
        mut waits: impl Iterator<Item = Raw<sys::CUevent>>,
        stream: sys::CUstream,
    ) -> EpResult<()> {
        counters::control_message();
        let status: Vec<Result<(), String>> =
            self.control.all_to_all(vec![
                queued.clone().map_err(|e| e.to_string());
                self.world_size()
            ])?;
        let failed = status
            .into_iter()
            .enumerate()
            .find_map(|(rank, s)| s.err().map(|reason| (rank, reason)));
        let ordered = waits.try_for_each(|event| wait_on(stream, event.0));
        if queued.is_err() || failed.is_some() || ordered.is_err() {
            self.drain_copies();
            queued?;
            ordered?;
            let (rank, reason) = failed.expect("a peer failed");
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
        local_placed: bool,
        pairing: &dyn Pairing,
        stream: u64,
    ) -> EpResult<()> {
        check_counts(self.rank(), self.world_size(), send_counts, recv_counts)?;
        let (send, recv) =
            spans_of_call(planes, send_counts, recv_counts, self.rank(), local_placed);
        self.exchange_spans(&send, &recv, Some(pairing), stream)
    }

    /// Where every rank shares one GPU: kernels reaching a peer GPU's memory over
    /// NVLink have not run on a multi-GPU host yet, so ranks on several GPUs keep
    /// the copy engines.
    fn direct(&self) -> Option<&dyn DirectAccess> {
        let one_gpu = self.devices.iter().all(|&d| d == self.devices[0]);
        one_gpu.then_some(self as &dyn DirectAccess)
    }
}

/// The ranks' kernels reach into each other's buffers: every buffer of the process
/// is in one address space, and peer access is enabled between its devices. The
/// events order it as the copies are ordered (see the module's protocol), the
/// caller's stream standing in for the copy streams: a rank's `ready` event is
/// recorded before the opening message, its stream waits for the `ready` events of
/// the peers it reaches before its kernels, and records `copied[me][peer]` after
/// them; after the closing barrier it waits for `copied[peer][me]` of the peers
/// that reach it.
impl DirectAccess for CudaPeerComm {
    fn direct_call(
        &self,
        offer: Vec<Vec<u64>>,
        reach: &[bool],
        reached_by: &[bool],
        pairing: &dyn Pairing,
        stream: u64,
        kernels: &mut dyn FnMut(&[Vec<u64>]) -> EpResult<()>,
    ) -> EpResult<()> {
        let (me, world) = (self.rank(), self.world_size());
        if reach.len() != world || reached_by.len() != world {
            return Err(EpError::Transport(format!(
                "rank {me}: a direct call needs {world} reach flags each way, got {} and {}",
                reach.len(),
                reached_by.len()
            )));
        }
        let stream = stream as sys::CUstream;
        let events = &self.events;
        set_current(&self.contexts, self.device())?;
        unsafe { result::event::record(events.ready[me].0, stream) }
            .map_err(|e| driver("cuEventRecord", e))?;
        let offers = open_call(self.control.as_ref(), pairing, offer)?;
        let peers = |flags: &[bool]| {
            let flags = flags.to_vec();
            (0..world).filter(move |&p| p != me && flags[p])
        };
        let queued = (|| {
            for peer in peers(reach) {
                wait_on(stream, events.ready[peer].0)?;
            }
            kernels(&offers)?;
            for peer in peers(reach) {
                unsafe { result::event::record(events.copied[me][peer].0, stream) }
                    .map_err(|e| driver("cuEventRecord", e))?;
            }
            Ok(())
        })();
        let waits = peers(reached_by).map(|peer| events.copied[peer][me]);
        self.close_call(queued, waits, stream)
    }
}

impl Drop for CudaPeerComm {
    fn drop(&mut self) {
        if set_current(&self.contexts, self.device()).is_ok() {
            for stream in &self.streams {
                // Copies may still be queued: the stream is released once they end.
                let _ = unsafe { result::stream::destroy(stream.0) };
            }
        }
    }
}
