//! The one error type of burn-ep: every kind of bad input or failed peer has a variant.

use std::fmt;
use std::time::Duration;

/// What went wrong in a burn-ep call. Each variant names the offending input so the
/// message alone is enough to fix the call.
#[derive(Debug, Clone, PartialEq)]
pub enum EpError {
    /// The group configuration is inconsistent (e.g. experts not divisible by ranks).
    InvalidConfig(String),
    /// A top-k slot holds an id that is neither `-1` nor in `0..num_experts`.
    ExpertIdOutOfRange {
        /// The rank that was given the id.
        rank: usize,
        /// The token, counted on that rank.
        token: usize,
        /// The top-k slot, `0..top_k`.
        slot: usize,
        /// The id given.
        id: i64,
        /// Experts of the group.
        num_experts: usize,
    },
    /// A token names the same expert in two of its top-k slots.
    DuplicateExpert {
        /// The rank that was given the token.
        rank: usize,
        /// The token, counted on that rank.
        token: usize,
        /// The expert named twice.
        expert: i64,
    },
    /// A tensor's shape is not the one the call needs.
    ShapeMismatch {
        /// The argument, by name.
        what: String,
        /// The shape the call needs.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A tensor's element type is not the one the call needs.
    DTypeMismatch {
        /// The argument, by name.
        what: String,
        /// The element type the call needs.
        expected: String,
        /// The element type given.
        got: String,
    },
    /// A tensor is on another device than the group (or than the handle it replays).
    DeviceMismatch {
        /// The argument, by name.
        what: String,
        /// The device it must be on.
        expected: String,
        /// The device it is on.
        got: String,
    },
    /// A rank was given more tokens than the configured maximum.
    TooManyTokens {
        /// The rank that was given the tokens.
        rank: usize,
        /// Tokens given.
        tokens: usize,
        /// `EpConfig::max_tokens_per_rank`.
        max: usize,
    },
    /// A replay (cached dispatch, combine, backward) does not match its routing handle.
    ReplayMismatch {
        /// What differs (an argument or a count), by name.
        what: String,
        /// What the handle recorded.
        handle: String,
        /// What the replay was given.
        got: String,
    },
    /// Two ranks made different collective calls at the same point: a message that
    /// arrived belongs to another routing handle or operation, or carries another row
    /// count than this rank's handle expects. Nothing was moved.
    ExchangeMismatch {
        /// The rank that found the mismatch.
        rank: usize,
        /// The peer whose message did not match.
        peer: usize,
        /// The call this rank made.
        expected: String,
        /// The call the peer's message belongs to.
        got: String,
    },
    /// A peer rank failed (panicked, returned an error or left) before answering.
    PeerFailed {
        /// The rank that failed.
        rank: usize,
        /// Why, as that rank saw it.
        reason: String,
    },
    /// This rank's device reported an error (a refused launch, a fault, a lost
    /// device). The group's pending and later calls on this rank fail with it, and
    /// its peers get [`EpError::PeerFailed`] naming this rank and the cause.
    DeviceFailed {
        /// This rank.
        rank: usize,
        /// The driver's message, with the burn-ep call that found it.
        reason: String,
    },
    /// Peers did not answer within the configured timeout.
    Timeout {
        /// The rank that waited.
        rank: usize,
        /// The peers it was still waiting for.
        waiting_for: Vec<usize>,
        /// How long it waited.
        after: Duration,
    },
    /// A collective failed on a communicator that cannot tell which peer is to blame
    /// (NCCL: a peer died, a connection broke, or the call ran past the timeout). The
    /// communicator is aborted; every later call on it fails at once.
    Aborted {
        /// The rank whose communicator was aborted.
        rank: usize,
        /// The communicator's error.
        reason: String,
    },
    /// Two devices of a cuda-peer group cannot reach each other peer-to-peer.
    NoPeerAccess {
        /// The CUDA device that cannot reach the other.
        from: usize,
        /// The CUDA device it cannot reach.
        to: usize,
    },
    /// The transport itself failed (wrong message, a driver call, ...).
    Transport(String),
}

impl fmt::Display for EpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EpError::InvalidConfig(msg) => write!(f, "invalid expert-parallel config: {msg}"),
            EpError::ExpertIdOutOfRange {
                rank,
                token,
                slot,
                id,
                num_experts,
            } => write!(
                f,
                "rank {rank}: topk_idx[{token}, {slot}] = {id} is not -1 and not in 0..{num_experts}"
            ),
            EpError::DuplicateExpert {
                rank,
                token,
                expert,
            } => write!(
                f,
                "rank {rank}: token {token} names expert {expert} in more than one top-k slot"
            ),
            EpError::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected shape {expected:?}, got {got:?}"),
            EpError::DTypeMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected dtype {expected}, got {got}"),
            EpError::DeviceMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected device {expected}, got {got}"),
            EpError::TooManyTokens { rank, tokens, max } => write!(
                f,
                "rank {rank}: {tokens} tokens exceed the configured maximum of {max} per rank"
            ),
            EpError::ReplayMismatch { what, handle, got } => write!(
                f,
                "replay does not match its routing handle: {what} is {got}, the handle recorded {handle}"
            ),
            EpError::ExchangeMismatch {
                rank,
                peer,
                expected,
                got,
            } => write!(
                f,
                "rank {rank}: rank {peer} made another exchange at the same point: \
                 this rank expected {expected}, rank {peer} sent {got} (every rank must make \
                 the same expert-parallel calls in the same order)"
            ),
            EpError::PeerFailed { rank, reason } => write!(f, "peer rank {rank} failed: {reason}"),
            EpError::DeviceFailed { rank, reason } => write!(
                f,
                "rank {rank}: the device failed, and this group cannot go on here: {reason}"
            ),
            EpError::Timeout {
                rank,
                waiting_for,
                after,
            } => write!(
                f,
                "rank {rank}: no answer from rank(s) {waiting_for:?} within {after:?}"
            ),
            EpError::Aborted { rank, reason } => {
                write!(f, "rank {rank}: communicator aborted: {reason}")
            }
            EpError::NoPeerAccess { from, to } => write!(
                f,
                "CUDA device {from} has no peer access to device {to}: the cuda-peer transport \
                 needs it between every pair of its devices (use the nccl transport instead)"
            ),
            EpError::Transport(msg) => write!(f, "transport error: {msg}"),
        }
    }
}

impl std::error::Error for EpError {}

/// The result of every fallible burn-ep call.
pub type EpResult<T> = Result<T, EpError>;
