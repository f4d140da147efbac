//! The `local` transport: ranks are threads of one process, and messages move
//! through a shared mailbox. It is the CPU default and the test bed.
//!
//! Every collective call of a rank gets the next sequence number; a message is
//! filed under (sequence, source, destination), so calls pair up by order, as with
//! NCCL. A rank that leaves (returns, fails or panics) is marked departed, and any
//! peer waiting on a message it will never send gets [`EpError::PeerFailed`] at
//! once; a peer that is merely silent gives [`EpError::Timeout`] after the
//! configured timeout. Nothing waits forever.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ep_core::{EpError, EpResult};

use crate::control::{check_call, Control};
use crate::Mesh;

/// How long a rank waits for its peers by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

type Message = Box<dyn Any + Send>;

#[derive(Default)]
struct Board {
    mail: HashMap<(u64, usize, usize), Message>,
    /// Why each rank left, if it has.
    departed: HashMap<usize, String>,
}

struct Fabric {
    board: Mutex<Board>,
    posted: Condvar,
}

impl Fabric {
    fn lock(&self) -> MutexGuard<'_, Board> {
        // A panic while holding the lock cannot leave the board half-written: every
        // critical section is a few map operations.
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank's end of the local transport.
pub struct LocalComm {
    mesh: Mesh,
    fabric: Arc<Fabric>,
    sequence: AtomicU64,
    timeout: Duration,
}

/// Makes the ends of a local transport for `world_size` ranks, to be moved into
/// one thread each.
pub fn local_comms(world_size: usize, timeout: Duration) -> Vec<LocalComm> {
    let fabric = Arc::new(Fabric {
        board: Mutex::new(Board::default()),
        posted: Condvar::new(),
    });
    (0..world_size)
        .map(|rank| LocalComm {
            mesh: Mesh::single_node(world_size, rank),
            fabric: fabric.clone(),
            sequence: AtomicU64::new(0),
            timeout,
        })
        .collect()
}

/// Runs `work` on `world_size` ranks, one scoped thread each, and returns each
/// rank's result in rank order. A rank that panics yields [`EpError::PeerFailed`]
/// naming itself, and its peers' pending calls fail instead of hanging.
pub fn run_local<R, F>(world_size: usize, timeout: Duration, work: F) -> Vec<EpResult<R>>
where
    R: Send,
    F: Fn(LocalComm) -> EpResult<R> + Sync,
{
    run_threads(local_comms(world_size, timeout), LocalComm::rank, work)
}

/// Runs `work` on every comm, one scoped thread each, and returns the results in
/// the comms' order; a panic becomes [`EpError::PeerFailed`] naming the rank.
pub(crate) fn run_threads<C, R, F>(
    comms: Vec<C>,
    rank_of: fn(&C) -> usize,
    work: F,
) -> Vec<EpResult<R>>
where
    C: Send,
    R: Send,
    F: Fn(C) -> EpResult<R> + Sync,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let work = &work;
                let rank = rank_of(&comm);
                let handle =
                    scope.spawn(move || panic::catch_unwind(AssertUnwindSafe(|| work(comm))));
                (rank, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(rank, handle)| match handle.join() {
                Ok(Ok(result)) => result,
                Ok(Err(payload)) | Err(payload) => Err(EpError::PeerFailed {
                    rank,
                    reason: format!("panicked: {}", panic_message(&payload)),
                }),
            })
            .collect()
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl LocalComm {
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn rank(&self) -> usize {
        self.mesh.rank()
    }

    pub fn world_size(&self) -> usize {
        self.mesh.world_size()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// All-to-all of one item per peer: `items[d]` goes to rank `d`, and the result's
    /// entry `s` is what rank `s` sent here. The all-to-all-v of row segments and the
    /// count exchange are both this call, with segments or counts as items.
    pub fn all_to_all<T: Send + 'static>(&self, items: Vec<T>) -> EpResult<Vec<T>> {
        let world = self.world_size();
        let me = self.rank();
        if items.len() != world {
            return Err(EpError::Transport(format!(
                "rank {me}: all_to_all needs one item per rank ({world}), got {}",
                items.len()
            )));
        }
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let mut board = self.fabric.lock();
        for (dest, item) in items.into_iter().enumerate() {
            board.mail.insert((seq, me, dest), Box::new(item));
        }
        self.fabric.posted.notify_all();

        let deadline = Instant::now() + self.timeout;
        loop {
            let missing: Vec<usize> = (0..world)
                .filter(|&src| !board.mail.contains_key(&(seq, src, me)))
                .collect();
            if missing.is_empty() {
                break;
            }
            if let Some((&rank, reason)) = missing
                .iter()
                .find_map(|src| board.departed.get_key_value(src))
            {
                return Err(EpError::PeerFailed {
                    rank,
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EpError::Timeout {
                    rank: me,
                    waiting_for: missing,
                    after: self.timeout,
                });
            }
            board = self
                .fabric
                .posted
                .wait_timeout(board, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        (0..world)
            .map(|src| {
                let message = board.mail.remove(&(seq, src, me)).expect("checked above");
                message.downcast::<T>().map(|b| *b).map_err(|_| {
                    EpError::Transport(format!(
                        "rank {me}: call {seq} from rank {src} carried another message type"
                    ))
                })
            })
            .collect()
    }

    /// Exchange of counts: `send[d]` is what this rank will send to `d`; returns what
    /// each rank will send here.
    pub fn exchange_counts(&self, send: &[usize]) -> EpResult<Vec<usize>> {
        self.all_to_all(send.to_vec())
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            "panicked".to_string()
        } else {
            format!(
                "left after {} collective calls",
                self.sequence.load(Ordering::Relaxed)
            )
        };
        let mut board = self.fabric.lock();
        board.departed.insert(self.rank(), reason);
        self.fabric.posted.notify_all();
    }
}

impl Control for LocalComm {
    fn rank(&self) -> usize {
        self.mesh.rank()
    }

    fn world_size(&self) -> usize {
        self.mesh.world_size()
    }

    fn all_to_all_bytes(&self, send: Vec<Vec<u8>>, recv_lens: &[usize]) -> EpResult<Vec<Vec<u8>>> {
        let me = self.rank();
        check_call(me, self.world_size(), &send, recv_lens)?;
        let received = self.all_to_all(send)?;
        for (src, (message, &len)) in received.iter().zip(recv_lens).enumerate() {
            if message.len() != len {
                return Err(EpError::Transport(format!(
                    "rank {me} expected {len} bytes from rank {src}, which sent {}",
                    message.len()
                )));
            }
        }
        Ok(received)
    }
}
