//! The interface of transports that move rows between device buffers themselves.
//! It speaks in raw device addresses, so it needs no tensor library: burn-ep hands
//! it the buffers of its tensors.

use ep_core::EpResult;

/// A transport that moves rows between device buffers.
pub trait DeviceExchange: Send + Sync {
    /// All-to-all-v of device rows: `send_counts[d]` rows of `row_bytes` bytes at
    /// `send` (segments in rank order) go to rank `d`; `recv_counts[s]` rows from rank
    /// `s` land at `recv` (segments in source-rank order). The send buffer must be
    /// written and the receive buffer allocated before the call; when it returns, the
    /// receive buffer is complete and the send buffer is no longer read.
    fn all_to_all_v(
        &self,
        send: u64,
        send_counts: &[usize],
        recv: u64,
        recv_counts: &[usize],
        row_bytes: usize,
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
        return Err(ep_core::EpError::Transport(format!(
            "rank {rank}: all_to_all_v needs {world} send and receive counts, got {} and {}",
            send_counts.len(),
            recv_counts.len()
        )));
    }
    Ok(())
}
