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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ep_core::{counters, EpError, EpResult};

use crate::control::{check_call, Control};
use crate::Mesh;

/// How long a rank waits for its peers by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a rank watches for its peers' messages before it sleeps on the condition
/// variable. Waking a sleeping thread costs tens of microseconds, as much as a small
/// dispatch's kernels; peers of one call usually post within a few microseconds of
/// each other. The watch yields the core, so ranks that outnumber cores still run.
const WATCH: Duration = Duration::from_micros(50);

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
    /// Bumped, under the board's lock, by every post and departure: a watching rank
    /// sees that the board changed without taking the lock.
    changes: AtomicU64,
    /// Ranks asleep on `posted`; a post with none skips the wake-up system call.
    sleepers: AtomicUsize,
}

impl Fabric {
    fn lock(&self) -> MutexGuard<'_, Board> {
        // A panic while holding the lock cannot leave the board half-written: every
        // critical section is a few map operations.
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `rank` departed and wakes its waiting peers. The first reason stays: a
    /// rank that left because its device failed and then returned an error is
    /// reported by the cause.
    fn depart(&self, rank: usize, reason: String) {
        let mut board = self.lock();
        board.departed.entry(rank).or_insert(reason);
        self.changed(&board);
    }

    /// Tells watching and sleeping ranks that the board changed. Called with the
    /// lock held, so a rank that checked the board and then counted itself among
    /// the sleepers (both under the lock) cannot miss the change.
    fn changed(&self, _held: &MutexGuard<'_, Board>) {
        self.changes.fetch_add(1, Ordering::Release);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.posted.notify_all();
        }
    }

    /// Waits, without the lock, until the board changes after `seen` or `until`
    /// passes: spins briefly, then yields the core between looks.
    fn watch(&self, seen: u64, until: Instant) {
        let mut looks = 0u32;
        while self.changes.load(Ordering::Acquire) == seen && Instant::now() < until {
            looks += 1;
            if looks < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// One rank's end of the local transport.
pub struct LocalComm {
    mesh: Mesh,
    fabric: Arc<Fabric>,
    sequence: AtomicU64,
    timeout: Duration,
    /// Set when a runner reports this rank's departure itself (see [`Departure`]).
    runner_reports: AtomicBool,
}

/// A runner's hold on a rank's departure: when the rank's work ends, its peers learn
/// why at once (returned, failed with an error, panicked with a message), even while
/// the rank's comm lives on inside routing handles or an autodiff graph.
pub(crate) struct Departure {
    fabric: Arc<Fabric>,
    rank: usize,
}

impl Departure {
    pub(crate) fn leave(&self, reason: String) {
        self.fabric.depart(self.rank, reason);
    }
}

/// Makes the ends of a local transport for `world_size` ranks, to be moved into
/// one thread each.
pub fn local_comms(world_size: usize, timeout: Duration) -> Vec<LocalComm> {
    let fabric = Arc::new(Fabric {
        board: Mutex::new(Board::default()),
        posted: Condvar::new(),
        changes: AtomicU64::new(0),
        sleepers: AtomicUsize::new(0),
    });
    (0..world_size)
        .map(|rank| LocalComm {
            mesh: Mesh::single_node(world_size, rank),
            fabric: fabric.clone(),
            sequence: AtomicU64::new(0),
            timeout,
            runner_reports: AtomicBool::new(false),
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
    run_threads(
        local_comms(world_size, timeout),
        LocalComm::rank,
        |comm| Some(comm.departure()),
        work,
    )
}

/// Runs `work` on every comm, one scoped thread each, and returns the results in
/// the comms' order; a panic becomes [`EpError::PeerFailed`] naming the rank and
/// carrying the panic's message. Where `departure_of` gives a hold on the rank's
/// mailbox, its peers learn at once that it left, and why.
pub(crate) fn run_threads<C, R, F>(
    comms: Vec<C>,
    rank_of: fn(&C) -> usize,
    departure_of: fn(&C) -> Option<Departure>,
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
                let departure = departure_of(&comm);
                let handle = scope.spawn(move || {
                    let result = panic::catch_unwind(AssertUnwindSafe(|| work(comm)))
                        .unwrap_or_else(|payload| Err(panicked(rank, payload.as_ref())));
                    if let Some(departure) = departure {
                        departure.leave(match &result {
                            Ok(_) => "returned".to_string(),
                            Err(EpError::PeerFailed { rank: r, reason }) if *r == rank => {
                                reason.clone()
                            }
                            Err(e) => format!("failed: {e}"),
                        });
                    }
                    result
                });
                (rank, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(rank, handle)| {
                handle
                    .join()
                    .unwrap_or_else(|payload| Err(panicked(rank, payload.as_ref())))
            })
            .collect()
    })
}

fn panicked(rank: usize, payload: &(dyn Any + Send)) -> EpError {
    EpError::PeerFailed {
        rank,
        reason: format!("panicked: {}", panic_message(payload)),
    }
}

/// The message of a panic, whatever its payload: `panic!("literal")` gives a
/// `&str`, a formatted `panic!` a `String`.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic whose payload is not a message".to_string()
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
        self.fabric.changed(&board);

        let start = Instant::now();
        let (watch_until, deadline) = (start + WATCH, start + self.timeout);
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
            if now < watch_until {
                let seen = self.fabric.changes.load(Ordering::Acquire);
                drop(board);
                self.fabric.watch(seen, watch_until);
                board = self.fabric.lock();
                continue;
            }
            self.fabric.sleepers.fetch_add(1, Ordering::Relaxed);
            board = self
                .fabric
                .posted
                .wait_timeout(board, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.fabric.sleepers.fetch_sub(1, Ordering::Relaxed);
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

    /// The hold a runner takes on this rank's departure; from then on the runner,
    /// not the comm's drop, tells the peers when and why the rank left.
    pub(crate) fn departure(&self) -> Departure {
        self.runner_reports.store(true, Ordering::Relaxed);
        Departure {
            fabric: self.fabric.clone(),
            rank: self.rank(),
        }
    }

    /// Exchange of counts: `send[d]` is what this rank will send to `d`; returns what
    /// each rank will send here.
    pub fn exchange_counts(&self, send: &[usize]) -> EpResult<Vec<usize>> {
        self.all_to_all(send.to_vec())
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if self.runner_reports.load(Ordering::Relaxed) {
            return;
        }
        let reason = if std::thread::panicking() {
            "panicked".to_string()
        } else {
            format!(
                "left after {} collective calls",
                self.sequence.load(Ordering::Relaxed)
            )
        };
        self.fabric.depart(self.rank(), reason);
    }
}

impl Control for LocalComm {
    fn rank(&self) -> usize {
        self.mesh.rank()
    }

    fn world_size(&self) -> usize {
        self.mesh.world_size()
    }

    fn leave(&self, reason: &str) {
        self.fabric.depart(self.rank(), reason.to_string());
    }

    fn all_to_all_bytes(&self, send: Vec<Vec<u8>>, recv_lens: &[usize]) -> EpResult<Vec<Vec<u8>>> {
        counters::control_message();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_asleep_past_its_watch_is_woken_by_a_late_post() {
        // Rank 1 posts long after rank 0 stopped watching and went to sleep: the post
        // must wake it. A lost wake-up leaves rank 0 asleep until its deadline (30 s),
        // where it would find the message and return as if nothing were wrong.
        let started = Instant::now();
        for _ in 0..3 {
            let results = run_local(2, Duration::from_secs(30), |comm| {
                if comm.rank() == 1 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                comm.all_to_all(vec![comm.rank() as u32 * 10; 2])
            });
            for result in results {
                assert_eq!(result.unwrap(), vec![0, 10]);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "woken by the post"
        );
    }

    #[test]
    fn a_panicking_rank_reports_its_own_message_to_everyone() {
        let results = run_local(2, Duration::from_secs(5), |comm| {
            if comm.rank() == 1 {
                panic!("rank {} has no data", comm.rank());
            }
            comm.all_to_all(vec![0u8; 2]).map(|_| ())
        });
        // Both ranks name rank 1 and carry its panic's own (formatted) message.
        for result in &results {
            match result {
                Err(EpError::PeerFailed { rank: 1, reason }) => {
                    assert_eq!(reason, "panicked: rank 1 has no data")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn peers_learn_of_a_departure_while_the_comm_lives_on() {
        let kept = std::sync::Mutex::new(Vec::new());
        let started = Instant::now();
        let results = run_local(2, Duration::from_secs(30), |comm| {
            if comm.rank() == 1 {
                // The comm outlives the rank's work, as inside a routing handle.
                kept.lock().unwrap().push(comm);
                return Err(EpError::InvalidConfig("no data".into()));
            }
            comm.all_to_all(vec![0u8; 2]).map(|_| ())
        });
        assert!(started.elapsed() < Duration::from_secs(10), "no timeout");
        match &results[0] {
            Err(EpError::PeerFailed { rank: 1, reason }) => {
                assert!(reason.contains("no data"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_calls_with_its_reason() {
        // Rank 1 stays in the group until rank 0 has its answer: what rank 0 hears
        // is the leave, not the runner's notice that rank 1 returned.
        let answered = std::sync::Barrier::new(2);
        let results = run_local(2, Duration::from_secs(600), |comm| {
            if comm.rank() == 1 {
                comm.leave("its device failed: a refused launch");
                answered.wait();
                return Ok(());
            }
            let result = comm.all_to_all(vec![0u8; 2]).map(|_| ());
            answered.wait();
            result
        });
        match &results[0] {
            Err(EpError::PeerFailed { rank: 1, reason }) => {
                assert_eq!(reason, "its device failed: a refused launch")
            }
            other => panic!("{other:?}"),
        }
    }
}
