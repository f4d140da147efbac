//! What the data path does, counted per thread (each rank is a thread): host
//! synchronisations, control messages, row exchanges, the bytes the device
//! transports sent, and burn-ep's own kernel launches. The bench reads them around each operation. A count is one add to a
//! thread-local cell, so they are always on.

use std::cell::Cell;
use std::ops::Sub;

/// Counts since the thread started (see [`snapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Times the host waited for a device: stream or client syncs and reads back.
    pub host_syncs: u64,
    /// Rounds of host messages between ranks (checks, counts, landing addresses,
    /// status), each an all-to-all of the control channel.
    pub control_messages: u64,
    /// All-to-alls of rows (payload, weights, expert ids, gradients).
    pub exchanges: u64,
    /// Kernels burn-ep launched itself (not Burn's ops it calls).
    pub kernel_launches: u64,
    /// Bytes the device transports sent from this rank: device and peer copies
    /// queued, NCCL sends, a rank's copy to itself included. (The local
    /// transport's host messages are not counted.)
    pub sent_bytes: u64,
}

impl Sub for Counts {
    type Output = Counts;

    fn sub(self, earlier: Counts) -> Counts {
        Counts {
            host_syncs: self.host_syncs - earlier.host_syncs,
            control_messages: self.control_messages - earlier.control_messages,
            exchanges: self.exchanges - earlier.exchanges,
            kernel_launches: self.kernel_launches - earlier.kernel_launches,
            sent_bytes: self.sent_bytes - earlier.sent_bytes,
        }
    }
}

thread_local! {
    static COUNTS: Cell<Counts> = const { Cell::new(Counts {
        host_syncs: 0,
        control_messages: 0,
        exchanges: 0,
        kernel_launches: 0,
        sent_bytes: 0,
    }) };
}

/// This thread's counts so far; the difference of two snapshots is what happened
/// between them.
pub fn snapshot() -> Counts {
    COUNTS.with(Cell::get)
}

fn add(update: impl FnOnce(&mut Counts)) {
    COUNTS.with(|cell| {
        let mut counts = cell.get();
        update(&mut counts);
        cell.set(counts);
    });
}

/// Counts a host synchronisation (a device read or sync the host waits on).
pub fn host_sync() {
    add(|c| c.host_syncs += 1);
}

/// Counts a control message sent to a peer.
pub fn control_message() {
    add(|c| c.control_messages += 1);
}

/// Counts a device exchange of rows.
pub fn exchange() {
    add(|c| c.exchanges += 1);
}

/// Counts a launch of one of burn-ep's own kernels.
pub fn kernel_launch() {
    add(|c| c.kernel_launches += 1);
}

/// Counts `bytes` handed to a device transport to send.
pub fn sent(bytes: usize) {
    add(|c| c.sent_bytes += bytes as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_thread_and_differences_are_what_happened() {
        let before = snapshot();
        host_sync();
        kernel_launch();
        kernel_launch();
        sent(96);
        sent(32);
        let other = std::thread::spawn(|| {
            control_message();
            snapshot()
        })
        .join()
        .unwrap();
        let here = snapshot() - before;
        assert_eq!(
            here,
            Counts {
                host_syncs: 1,
                kernel_launches: 2,
                sent_bytes: 128,
                ..Counts::default()
            }
        );
        assert_eq!(other.control_messages, 1);
        assert_eq!(here.control_messages, 0);
    }
}
