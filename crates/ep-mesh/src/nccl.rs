//! The `nccl` transport: one NCCL communicator per rank, rows moving by grouped
//! send/receive (`ncclGroupStart` … `ncclGroupEnd`), and the control channel (the
//! count exchange, barriers) over the same communicator through a small device
//! buffer. NCCL picks its own path per peer: NVLink or PCIe inside a node,
//! InfiniBand/RoCE or sockets between nodes.
//!
//! Nothing waits forever. The communicator is non-blocking, and every call polls
//! its stream and NCCL's asynchronous error under a deadline: a peer that died
//! (its connections close) fails the call as soon as NCCL notices, a peer that is
//! merely silent fails it at the timeout. Either way the communicator is aborted
//! (`ncclCommAbort`), so no kernel is left spinning, and every later call on it
//! fails at once with the first reason.
//!
//! Like the cuda-peer transport, the caller guarantees that the send buffer is
//! written and the receive buffer allocated before a call; a rank's own segment is
//! a copy on its device, never a message.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{result, sys};
use cudarc::nccl::sys as nccl;
use ep_core::{counters, EpError, EpResult};

use crate::control::{check_call, Control};
use crate::cuda_peer::{driver, primary_context, stream_waits_for, Raw};
use crate::device_exchange::{
    check_counts, check_pairing, spans_of_call, spans_per_rank, DeviceExchange, Pairing, Plane,
    Span,
};
use crate::local::run_threads;
use crate::rendezvous::{exchange_payload, RendezvousConfig};

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// One rank's NCCL communicator, with its stream on the rank's device.
pub struct NcclComm {
    comm: Raw<nccl::ncclComm_t>,
    rank: usize,
    world_size: usize,
    device: usize,
    context: Raw<sys::CUcontext>,
    stream: Raw<sys::CUstream>,
    timeout: Duration,
    /// Send the rank's own rows through NCCL too ([`NcclComm::with_loopback`]): a
    /// check of the NCCL path on a host with one GPU, where a group has one rank.
    loopback: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Device buffer of control messages (address, bytes), grown on demand.
    staging: Option<(u64, usize)>,
    /// Why the communicator was aborted, once it has been.
    aborted: Option<String>,
}

/// A send or a receive of one grouped call: peer, device address, bytes.
pub(crate) type Transfer = (usize, u64, usize);

/// NCCL 2.14's `ncclConfig_t`, the prefix every later version starts with. NCCL
/// copies `size` bytes of it over its defaults, so the fields of newer versions
/// keep their defaults whatever NCCL is installed.
#[repr(C)]
struct ConfigPrefix {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
}

impl ConfigPrefix {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
    fn non_blocking() -> Self {
        const UNDEF: c_int = c_int::MIN;
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 2_14_00,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
        }
    }
}

/// Fails with a clear message where the process cannot load NCCL (cudarc looks for
/// `libnccl.so` and `libnccl.so.<CUDA major>`).
fn check_nccl_loads() -> EpResult<()> {
    if unsafe { nccl::is_culib_present() } {
        Ok(())
    } else {
        Err(EpError::Transport(
            "the nccl transport cannot load NCCL: put a `libnccl.so` (a link to \
             libnccl.so.2 will do) on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NCCL's name of a result, and what it last said about `comm`.
fn describe(result: nccl::ncclResult_t, comm: nccl::ncclComm_t) -> String {
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let name = text(unsafe { nccl::ncclGetErrorString(result) });
    let last = text(unsafe { nccl::ncclGetLastError(comm) });
    if last.is_empty() {
        format!("{result:?} ({name})")
    } else {
        format!("{result:?} ({name}): {last}")
    }
}

/// The bytes of a fresh NCCL unique id, the one secret the ranks of a communicator
/// share (rank 0 makes it, the rendezvous hands it out).
pub fn nccl_unique_id() -> EpResult<Vec<u8>> {
    check_nccl_loads()?;
    let id = cudarc::nccl::result::get_uniqueid()
        .map_err(|e| EpError::Transport(format!("ncclGetUniqueId failed: {:?}", e.0)))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The unique id through the rendezvous of `config`: process 0 makes and hosts it.
pub fn unique_id_from_rendezvous(config: &RendezvousConfig) -> EpResult<Vec<u8>> {
    let id = exchange_payload(config, nccl_unique_id)?;
    if id.len() != UNIQUE_ID_BYTES {
        return Err(EpError::Transport(format!(
            "the rendezvous handed out {} bytes, not an NCCL unique id",
            id.len()
        )));
    }
    Ok(id)
}

/// Runs `work` on `world_size` ranks of an NCCL group inside this process, one
/// thread and one GPU each (rank `r` on device `r`), and returns each rank's
/// result in rank order. NCCL refuses two ranks on one device, so `world_size`
/// may not exceed the GPUs this process sees.
pub fn run_nccl<R, F>(world_size: usize, timeout: Duration, work: F) -> EpResult<Vec<EpResult<R>>>
where
    R: Send,
    F: Fn(NcclComm) -> EpResult<R> + Sync,
{
    let devices = crate::cuda_peer::cuda_device_count()?;
    if world_size > devices {
        return Err(EpError::InvalidConfig(format!(
            "the nccl transport puts each rank on its own GPU: {world_size} ranks, \
             this process sees {devices} GPU(s)"
        )));
    }
    let id = nccl_unique_id()?;
    Ok(run_threads(
        (0..world_size).collect(),
        |rank| *rank,
        // NCCL peers learn of a departure through the communicator's abort.
        |_| None,
        |rank| work(NcclComm::init(&id, world_size, rank, rank, timeout)?),
    ))
}

impl NcclComm {
    /// Joins the communicator named by `unique_id` as `rank` of `world_size`, on CUDA
    /// device `device`. Every rank of the communicator must call it (from its own
    /// thread or process) within `timeout`.
    pub fn init(
        unique_id: &[u8],
        world_size: usize,
        rank: usize,
        device: usize,
        timeout: Duration,
    ) -> EpResult<Self> {
        check_nccl_loads()?;
        if unique_id.len() != UNIQUE_ID_BYTES || rank >= world_size {
            return Err(EpError::InvalidConfig(format!(
                "NCCL communicator: rank {rank} of {world_size} with a {}-byte id",
                unique_id.len()
            )));
        }
        let mut id = nccl::ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (to, &from) in id.internal.iter_mut().zip(unique_id) {
            *to = from as c_char;
        }
        result::init().map_err(|e| driver("cuInit", e))?;
        let context = primary_context(device)?;
        unsafe { result::ctx::set_current(context) }.map_err(|e| driver("cuCtxSetCurrent", e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver("cuStreamCreate", e))?;
        let mut config = ConfigPrefix::non_blocking();
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        let started = unsafe {
            nccl::ncclCommInitRankConfig(
                &mut comm,
                world_size as c_int,
                id,
                rank as c_int,
                (&mut config as *mut ConfigPrefix).cast(),
            )
        };
        let this = Self {
            comm: Raw(comm),
            rank,
            world_size,
            device,
            context: Raw(context),
            stream: Raw(stream),
            timeout,
            loopback: false,
            state: Mutex::new(State::default()),
        };
        let deadline = Instant::now() + timeout;
        {
            let mut state = this.lock_state();
            this.check(&mut state, "ncclCommInitRankConfig", started)?;
            this.settle(&mut state, "ncclCommInitRankConfig", deadline, || {
                (0..world_size).filter(|&r| r != rank).collect()
            })?;
        }
        Ok(this)
    }

    /// With `on`, this rank's own rows go through NCCL's send and receive too,
    /// instead of a device copy or the caller's kernels: a diagnostic for a host
    /// with one GPU, where a group has one rank and would otherwise never call them.
    pub fn with_loopback(mut self, on: bool) -> Self {
        self.loopback = on;
        self
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The CUDA ordinal this rank drives.
    pub fn device(&self) -> usize {
        self.device
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of a communicator still usable: an aborted one fails at once.
    fn usable(&self) -> EpResult<MutexGuard<'_, State>> {
        let state = self.lock_state();
        if let Some(reason) = &state.aborted {
            return Err(EpError::Aborted {
                rank: self.rank,
                reason: format!("an earlier call failed: {reason}"),
            });
        }
        unsafe { result::ctx::set_current(self.context.0) }
            .map_err(|e| driver("cuCtxSetCurrent", e))?;
        Ok(state)
    }

    /// Aborts the communicator (so no NCCL kernel keeps waiting) and remembers why.
    fn abort(&self, state: &mut State, reason: String) {
        if state.aborted.is_none() {
            unsafe { nccl::ncclCommAbort(self.comm.0) };
            state.aborted = Some(reason);
        }
    }

    fn fail(&self, state: &mut State, reason: String) -> EpError {
        self.abort(state, reason.clone());
        EpError::Aborted {
            rank: self.rank,
            reason,
        }
    }

    fn time_out(&self, state: &mut State, what: &str, waiting_for: Vec<usize>) -> EpError {
        self.abort(state, format!("{what} timed out after {:?}", self.timeout));
        EpError::Timeout {
            rank: self.rank,
            waiting_for,
            after: self.timeout,
        }
    }

    /// A call's immediate result: success or in progress go on, anything else fails.
    fn check(&self, state: &mut State, what: &str, result: nccl::ncclResult_t) -> EpResult<()> {
        match result {
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => Ok(()),
            e => Err(self.fail(state, format!("{what}: {}", describe(e, self.comm.0)))),
        }
    }

    /// NCCL's asynchronous state: `Ok(true)` once nothing is in progress.
    fn settled(&self, state: &mut State, what: &str) -> EpResult<bool> {
        let mut status = nccl::ncclResult_t::ncclInProgress;
        let asked = unsafe { nccl::ncclCommGetAsyncError(self.comm.0, &mut status) };
        self.check(state, "ncclCommGetAsyncError", asked)?;
        match status {
            nccl::ncclResult_t::ncclSuccess => Ok(true),
            nccl::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(self.fail(state, format!("{what}: {}", describe(e, self.comm.0)))),
        }
    }

    /// Waits until a non-blocking call has finished its host side (initialisation,
    /// or the enqueueing of a group).
    fn settle(
        &self,
        state: &mut State,
        what: &str,
        deadline: Instant,
        peers: impl Fn() -> Vec<usize>,
    ) -> EpResult<()> {
        while !self.settled(state, what)? {
            if Instant::now() >= deadline {
                return Err(self.time_out(state, what, peers()));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Waits until the stream has run everything queued, watching NCCL's errors.
    fn wait_stream(
        &self,
        state: &mut State,
        what: &str,
        deadline: Instant,
        peers: impl Fn() -> Vec<usize>,
    ) -> EpResult<()> {
        counters::host_sync();
        let mut polls = 0u32;
        loop {
            match unsafe { sys::cuStreamQuery(self.stream.0) } {
                sys::CUresult::CUDA_SUCCESS => return self.settled(state, what).map(|_| ()),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(state, format!("{what}: cuStreamQuery: {e:?}"))),
            }
            self.settled(state, what)?;
            if Instant::now() >= deadline {
                return Err(self.time_out(state, what, peers()));
            }
            // Spin for the short waits a dispatch makes, then stop burning a core.
            polls += 1;
            if polls < 10_000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Queues one grouped call of sends and receives (peers other than this rank)
    /// and waits until NCCL has put it on the stream.
    fn enqueue(
        &self,
        state: &mut State,
        sends: &[Transfer],
        recvs: &[Transfer],
        deadline: Instant,
    ) -> EpResult<()> {
        let stream: nccl::cudaStream_t = self.stream.0.cast();
        let grouped = (|| {
            let started = unsafe { nccl::ncclGroupStart() };
            self.check(state, "ncclGroupStart", started)?;
            let calls = sends
                .iter()
                .map(|t| (t, true))
                .chain(recvs.iter().map(|t| (t, false)));
            for (&(peer, address, bytes), is_send) in calls.filter(|(t, _)| t.2 > 0) {
                let (what, called) = unsafe {
                    let (dtype, peer) = (nccl::ncclDataType_t::ncclUint8, peer as c_int);
                    if is_send {
                        let from = address as *const c_void;
                        (
                            "ncclSend",
                            nccl::ncclSend(from, bytes, dtype, peer, self.comm.0, stream),
                        )
                    } else {
                        let to = address as *mut c_void;
                        (
                            "ncclRecv",
                            nccl::ncclRecv(to, bytes, dtype, peer, self.comm.0, stream),
                        )
                    }
                };
                self.check(state, what, called)?;
            }
            Ok(())
        })();
        // The group is closed whatever happened inside it.
        let ended = unsafe { nccl::ncclGroupEnd() };
        grouped?;
        self.check(state, "ncclGroupEnd", ended)?;
        self.settle(state, "ncclGroupEnd", deadline, || peers_of(sends, recvs))
    }

    /// Copies this rank's own segment on its device, on the transport's stream.
    fn copy_own(&self, to: u64, from: u64, bytes: usize) -> EpResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { result::memcpy_dtod_async(to, from, bytes, self.stream.0) }
            .map_err(|e| driver("cuMemcpyDtoDAsync", e))
    }

    /// Starts one grouped call of sends and receives to peers other than this rank;
    /// [`NcclComm::finish`] waits for it.
    pub(crate) fn start(
        &self,
        sends: &[Transfer],
        recvs: &[Transfer],
        deadline: Instant,
    ) -> EpResult<()> {
        let mut state = self.usable()?;
        self.enqueue(&mut state, sends, recvs, deadline)
    }

    /// Orders the work queued on NCCL's stream from now on after the work queued
    /// on `stream` so far.
    pub(crate) fn follow(&self, stream: u64) -> EpResult<()> {
        let _state = self.usable()?;
        stream_waits_for(self.stream.0, stream as sys::CUstream)
    }

    /// Waits for what [`NcclComm::start`] queued (and anything queued before it).
    pub(crate) fn finish(
        &self,
        sends: &[Transfer],
        recvs: &[Transfer],
        deadline: Instant,
    ) -> EpResult<()> {
        let mut state = self.usable()?;
        self.wait_stream(&mut state, "all-to-all", deadline, || {
            peers_of(sends, recvs)
        })
    }

    /// One all-to-all of device spans, one list per rank (one span per plane):
    /// NCCL for the peers, a device copy for this rank's own spans; returns once
    /// the receive buffers are complete.
    fn exchange(&self, send: &[Vec<Span>], recv: &[Vec<Span>]) -> EpResult<()> {
        let deadline = Instant::now() + self.timeout;
        let me = self.rank;
        let by_nccl = |peer: usize| peer != me || self.loopback;
        let (sends, recvs) = (transfers(send, by_nccl), transfers(recv, by_nccl));
        self.start(&sends, &recvs, deadline)?;
        if !self.loopback {
            for (&(to, bytes), &(from, _)) in recv[me].iter().zip(&send[me]) {
                self.copy_own(to, from, bytes)?;
            }
        }
        self.finish(&sends, &recvs, deadline)
    }

    /// Makes sure the staging buffer holds `bytes`; returns its address.
    fn staging(&self, state: &mut State, bytes: usize) -> EpResult<u64> {
        match state.staging {
            Some((address, size)) if size >= bytes => Ok(address),
            old => {
                if let Some((address, _)) = old {
                    unsafe { result::free_sync(address) }.map_err(|e| driver("cuMemFree", e))?;
                    state.staging = None;
                }
                let size = bytes.next_power_of_two().max(4096);
                let address =
                    unsafe { result::malloc_sync(size) }.map_err(|e| driver("cuMemAlloc", e))?;
                state.staging = Some((address, size));
                Ok(address)
            }
        }
    }
}

/// The NCCL transfers of the spans of the ranks `keep` accepts, in rank order and,
/// per rank, in plane order (both ends queue them alike, so they pair up).
pub(crate) fn transfers(spans: &[Vec<Span>], keep: impl Fn(usize) -> bool) -> Vec<Transfer> {
    spans
        .iter()
        .enumerate()
        .filter(|&(peer, _)| keep(peer))
        .flat_map(|(peer, spans)| {
            spans
                .iter()
                .map(move |&(address, bytes)| (peer, address, bytes))
        })
        .collect()
}

/// The peers a grouped call waits on.
fn peers_of(sends: &[Transfer], recvs: &[Transfer]) -> Vec<usize> {
    let mut peers: Vec<usize> = sends
        .iter()
        .chain(recvs)
        .filter(|t| t.2 > 0)
        .map(|t| t.0)
        .collect();
    peers.sort_unstable();
    peers.dedup();
    peers
}

impl DeviceExchange for NcclComm {
    fn all_to_all_v(
        &self,
        planes: &[Plane],
        send_counts: &[usize],
        recv_counts: &[usize],
        local_placed: bool,
        pairing: &dyn Pairing,
        stream: u64,
    ) -> EpResult<()> {
        check_counts(self.rank, self.world_size, send_counts, recv_counts)?;
        check_pairing(self, pairing)?;
        // NCCL's stream starts after the caller's work; the host waits for NCCL.
        self.follow(stream)?;
        let (send, recv) = spans_of_call(planes, send_counts, recv_counts, self.rank, local_placed);
        self.exchange(&send, &recv)
    }

    fn moves_own_rows(&self) -> bool {
        self.loopback
    }
}

/// Control messages go through a device buffer: up, across, down.
impl Control for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_to_all_bytes(&self, send: Vec<Vec<u8>>, recv_lens: &[usize]) -> EpResult<Vec<Vec<u8>>> {
        check_call(self.rank, self.world_size, &send, recv_lens)?;
        counters::control_message();
        let outgoing: Vec<u8> = send.concat();
        let incoming_len: usize = recv_lens.iter().sum();
        let address = {
            let mut state = self.usable()?;
            self.staging(&mut state, outgoing.len() + incoming_len)?
        };
        if !outgoing.is_empty() {
            unsafe { result::memcpy_htod_async(address, &outgoing, self.stream.0) }
                .map_err(|e| driver("cuMemcpyHtoDAsync", e))?;
        }
        let recv_base = address + outgoing.len() as u64;
        let send_lens: Vec<usize> = send.iter().map(Vec::len).collect();
        let bytes = [Plane {
            send: address,
            recv: recv_base,
            row_bytes: 1,
        }];
        self.exchange(
            &spans_per_rank(&bytes, &send_lens, |p| p.send),
            &spans_per_rank(&bytes, recv_lens, |p| p.recv),
        )?;
        let mut incoming = vec![0u8; incoming_len];
        if incoming_len > 0 {
            unsafe { result::memcpy_dtoh_sync(&mut incoming, recv_base) }
                .map_err(|e| driver("cuMemcpyDtoH", e))?;
        }
        let mut rest = incoming.as_slice();
        Ok(recv_lens
            .iter()
            .map(|&len| {
                let (message, tail) = rest.split_at(len);
                rest = tail;
                message.to_vec()
            })
            .collect())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let mut state = self.lock_state();
        let staging = state.staging.take();
        if unsafe { result::ctx::set_current(self.context.0) }.is_err() {
            return;
        }
        if let Some((address, _)) = staging {
            let _ = unsafe { result::free_sync(address) };
        }
        if state.aborted.is_none() {
            // A clean end flushes NCCL's work first; one that fails or cannot finish
            // in time (a peer gone quiet) is aborted by `check`/`settle` instead of
            // hanging the drop.
            let finalized = unsafe { nccl::ncclCommFinalize(self.comm.0) };
            let deadline = Instant::now() + self.timeout;
            let _ = self
                .check(&mut state, "ncclCommFinalize", finalized)
                .and_then(|_| self.settle(&mut state, "ncclCommFinalize", deadline, Vec::new));
            if state.aborted.is_none() {
                unsafe { nccl::ncclCommDestroy(self.comm.0) };
            }
        }
        let _ = unsafe { result::stream::destroy(self.stream.0) };
    }
}
