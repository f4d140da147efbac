//! The interface of transports that move rows between device buffers themselves.
//! It speaks in raw device addresses, so it needs no tensor library: burn-ep hands
//! it the buffers of its tensors.

use ep_core::{EpError, EpResult};

use crate::control::Control;

/// One buffer pair of an exchange: rows of `row_bytes` bytes at `send` (segments in
/// rank order) go out, and rows from each source land at `recv` (segments in
/// source-rank order). The planes of one exchange share its row counts: a payload
/// and its per-row metadata move together, in one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plane {
    pub send: u64,
    pub recv: u64,
    pub row_bytes: usize,
}

/// What the ranks of a group call tell each other before anything moves, so that
/// two ranks at different calls fail with both calls named instead of trading
/// rows: every call opens with one control message per peer, the same length for
/// every call of the group, that starts with three words saying what the call is.
/// The rest of the message is the call's own (counts, landing addresses). Equal
/// lengths let any two calls read each other's words, on transports that need
/// receive lengths up front (NCCL) as well.
pub trait Pairing: Sync {
    /// The length, in words, of every opening message of the group.
    fn message_words(&self) -> usize;

    /// The words this rank tells `peer`.
    fn words_for(&self, peer: usize) -> [u64; 3];

    /// Checks the words `peer` told this rank.
    fn check(&self, peer: usize, words: [u64; 3]) -> EpResult<()>;
}

/// Opens a group call: sends each peer the pairing words followed by `rest[peer]`
/// (padded to the group's message length), checks every peer's words, and returns
/// the rest of each peer's message (padding included), in rank order.
pub fn open_call(
    control: &dyn Control,
    pairing: &dyn Pairing,
    rest: Vec<Vec<u64>>,
) -> EpResult<Vec<Vec<u64>>> {
    let len = pairing.message_words();
    let messages = rest
        .into_iter()
        .enumerate()
        .map(|(peer, rest)| {
            if 3 + rest.len() > len {
                return Err(EpError::Transport(format!(
                    "a call's opening message needs {} words, the group's are {len}",
                    3 + rest.len()
                )));
            }
            let mut words = pairing.words_for(peer).to_vec();
            words.extend(rest);
            words.resize(len, 0);
            Ok(words)
        })
        .collect::<EpResult<_>>()?;
    let received = control.all_to_all_words(messages, len)?;
    received
        .into_iter()
        .enumerate()
        .map(|(peer, mut words)| {
            pairing.check(peer, [words[0], words[1], words[2]])?;
            Ok(words.split_off(3))
        })
        .collect()
}

/// A call that carries nothing but its pairing check.
pub fn check_pairing(control: &dyn Control, pairing: &dyn Pairing) -> EpResult<()> {
    open_call(control, pairing, vec![Vec::new(); control.world_size()]).map(|_| ())
}

/// A transport that moves rows between device buffers.
pub trait DeviceExchange: Send + Sync {
    /// All-to-all-v of device rows: `send_counts[d]` rows of every plane go to rank
    /// `d`; `recv_counts[s]` rows of every plane come from rank `s`. `pairing` is
    /// checked with every peer before anything moves.
    ///
    /// `stream` is the CUDA stream (a `CUstream`, as an integer; 0 is CUDA's
    /// default stream) that writes the send buffers and reads the receive buffers.
    /// The exchange starts after the work queued on it before the call, and work
    /// queued on it after the call sees the received rows and may release both
    /// buffers. The host need not synchronise the stream before or after;
    /// transports that cannot order on the device wait on the host instead.
    ///
    /// With `local_placed`, the rows this rank sends itself are already in its
    /// receive buffers (the caller's kernels wrote them there): only the rows
    /// between distinct ranks move, and this rank's own send segment is not read.
    fn all_to_all_v(
        &self,
        planes: &[Plane],
        send_counts: &[usize],
        recv_counts: &[usize],
        local_placed: bool,
        pairing: &dyn Pairing,
        stream: u64,
    ) -> EpResult<()>;

    /// Whether a rank's own rows should go through this transport even where the
    /// caller could place them itself: NCCL's loopback diagnostic, which sends them
    /// through NCCL so that a one-GPU group exercises its sends and receives.
    fn moves_own_rows(&self) -> bool {
        false
    }

    /// Kernels that reach into the peers' buffers themselves, where the transport
    /// allows it (see [`DirectAccess`]); `None` where rows move only by its copies.
    fn direct(&self) -> Option<&dyn DirectAccess> {
        None
    }
}

/// Buffer addresses traded between the ranks of one call, so that each rank's
/// kernels read or write its peers' device buffers themselves (ranks of one process
/// with peer access), instead of the transport copying rows between them.
pub trait DirectAccess: Sync {
    /// One call. The work queued on `stream` before it is done before any peer
    /// touches this rank's buffers. Each peer is told `offer[peer]` (addresses in
    /// this rank's buffers, after the pairing words), and `kernels` gets what each
    /// peer offered this rank; the kernels it queues on `stream` may touch the
    /// offered buffers of the peers in `reach`. Work queued on `stream` after the
    /// call comes after the kernels of the peers in `reached_by` that touch this
    /// rank's buffers, and each peer's later work after this rank's kernels.
    /// Every rank gets to the call's end, a failed one as well, so that no peer
    /// waits for it.
    fn direct_call(
        &self,
        offer: Vec<Vec<u64>>,
        reach: &[bool],
        reached_by: &[bool],
        pairing: &dyn Pairing,
        stream: u64,
        kernels: &mut dyn FnMut(&[Vec<u64>]) -> EpResult<()>,
    ) -> EpResult<()>;
}

/// The check every implementation makes first: one send and one receive count per
/// rank of the group.
#[cfg(feature = "cuda")]
pub(crate) fn check_counts(
    rank: usize,
    world: usize,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> EpResult<()> {
    if send_counts.len() != world || recv_counts.len() != world {
        return Err(EpError::Transport(format!(
            "rank {rank}: all_to_all_v needs {world} send and receive counts, got {} and {}",
            send_counts.len(),
            recv_counts.len()
        )));
    }
    Ok(())
}

/// The spans an all-to-all-v moves, send side and receive side, per rank (see
/// [`spans_per_rank`]); `rank`'s own spans are empty when its rows were placed by
/// the caller, so no transport copies them. Every transport's call makes its
/// spans here once, so the bytes it sends are counted here.
#[cfg(feature = "cuda")]
pub(crate) fn spans_of_call(
    planes: &[Plane],
    send_counts: &[usize],
    recv_counts: &[usize],
    rank: usize,
    local_placed: bool,
) -> (Vec<Vec<Span>>, Vec<Vec<Span>>) {
    let mut send = spans_per_rank(planes, send_counts, |p| p.send);
    let mut recv = spans_per_rank(planes, recv_counts, |p| p.recv);
    if local_placed {
        for span in send[rank].iter_mut().chain(recv[rank].iter_mut()) {
            span.1 = 0;
        }
    }
    ep_core::counters::sent(send.iter().flatten().map(|&(_, bytes)| bytes).sum());
    (send, recv)
}

/// A contiguous piece of a buffer: its address and length in bytes.
#[cfg(feature = "cuda")]
pub(crate) type Span = (u64, usize);

/// For every rank, the spans its rows occupy in each plane's buffer (`send` or
/// `recv` side, as `address` picks), the buffers cut into `counts` rows in rank
/// order.
#[cfg(feature = "cuda")]
pub(crate) fn spans_per_rank(
    planes: &[Plane],
    counts: &[usize],
    address: impl Fn(&Plane) -> u64,
) -> Vec<Vec<Span>> {
    let mut before = 0usize;
    counts
        .iter()
        .map(|&rows| {
            let spans = planes
                .iter()
                .map(|p| {
                    (
                        address(p) + (before * p.row_bytes) as u64,
                        rows * p.row_bytes,
                    )
                })
                .collect();
            before += rows;
            spans
        })
        .collect()
}
