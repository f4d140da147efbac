//! The control channel of a group: small host messages between ranks (the count
//! exchange, barriers, the all-reduce of dense gradients). Every transport serves
//! it: the local mailbox in one process, NCCL across processes.
//!
//! The one primitive is an all-to-all of byte messages whose receive lengths the
//! caller knows, as NCCL's receives need them; messages of unknown length take a
//! second round that first moves the lengths.

use ep_core::{EpError, EpResult};

/// Host messages between the ranks of a group. Calls pair up by order, as
/// collectives do: every rank makes the same calls in the same order.
pub trait Control: Send + Sync {
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// `send[d]` goes to rank `d`; `recv_lens[s]` is the length of what rank `s`
    /// sends here. Returns the messages in source-rank order. A length that does not
    /// match what the peer sent is an error where the transport can see it.
    fn all_to_all_bytes(&self, send: Vec<Vec<u8>>, recv_lens: &[usize]) -> EpResult<Vec<Vec<u8>>>;

    /// All-to-all of `len` 64-bit words per rank.
    fn all_to_all_words(&self, send: Vec<Vec<u64>>, len: usize) -> EpResult<Vec<Vec<u64>>> {
        let send = send
            .into_iter()
            .map(|words| words.iter().flat_map(|w| w.to_le_bytes()).collect())
            .collect();
        let received = self.all_to_all_bytes(send, &vec![len * 8; self.world_size()])?;
        Ok(received.iter().map(|bytes| words_of(bytes)).collect())
    }

    /// All-to-all of messages of any length: the lengths move first.
    fn all_to_all_messages(&self, send: Vec<Vec<u8>>) -> EpResult<Vec<Vec<u8>>> {
        let lens = send.iter().map(|m| vec![m.len() as u64]).collect();
        let recv_lens: Vec<usize> = self
            .all_to_all_words(lens, 1)?
            .iter()
            .map(|l| l[0] as usize)
            .collect();
        self.all_to_all_bytes(send, &recv_lens)
    }

    /// Leaves the group for `reason` (this rank's device failed, say): the peers'
    /// pending and later calls that wait on this rank fail with
    /// [`EpError::PeerFailed`] naming it and the reason, at once where the transport
    /// can tell them (the local mailbox, and so the cuda-peer transport). NCCL has no
    /// such message: its peers fail at their own deadline.
    fn leave(&self, _reason: &str) {}

    /// Returns once every rank has called it, or with the error a failed or silent
    /// peer gives.
    fn barrier(&self) -> EpResult<()> {
        let world = self.world_size();
        self.all_to_all_bytes(vec![vec![1]; world], &vec![1; world])
            .map(|_| ())
    }

    /// Sums `values` over the ranks in rank order, so every rank gets bitwise the
    /// same result whatever the transport. Every rank must pass the same length.
    fn all_reduce_sum(&self, values: &[f32]) -> EpResult<Vec<f32>> {
        let world = self.world_size();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let received = self.all_to_all_bytes(vec![bytes; world], &vec![values.len() * 4; world])?;
        let mut sum = vec![0.0f32; values.len()];
        for part in &received {
            for (s, v) in sum.iter_mut().zip(part.chunks_exact(4)) {
                *s += f32::from_le_bytes(v.try_into().expect("chunks of 4"));
            }
        }
        Ok(sum)
    }
}

fn words_of(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("chunks of 8")))
        .collect()
}

/// The checks every implementation makes before moving anything.
pub(crate) fn check_call(
    rank: usize,
    world: usize,
    send: &[Vec<u8>],
    recv_lens: &[usize],
) -> EpResult<()> {
    if send.len() != world || recv_lens.len() != world {
        return Err(EpError::Transport(format!(
            "rank {rank}: a control all-to-all needs {world} messages and receive lengths, \
             got {} and {}",
            send.len(),
            recv_lens.len()
        )));
    }
    Ok(())
}
