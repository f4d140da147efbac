//! The local transport: routing of messages, and faults that must not hang.

use std::time::{Duration, Instant};

use ep_core::EpError;
use ep_mesh::run_local;
use rstest::rstest;

#[rstest]
fn all_to_all_delivers_each_item_to_its_rank(#[values(1, 2, 3, 4)] world: usize) {
    let results = run_local(world, Duration::from_secs(10), |comm| {
        let me = comm.rank();
        let mut received = Vec::new();
        for round in 0..5usize {
            let items: Vec<(usize, usize, usize)> = (0..world).map(|d| (round, me, d)).collect();
            received.push(comm.all_to_all(items)?);
        }
        Ok(received)
    });
    for (me, result) in results.into_iter().enumerate() {
        for (round, got) in result.unwrap().into_iter().enumerate() {
            let expect: Vec<_> = (0..world).map(|s| (round, s, me)).collect();
            assert_eq!(got, expect);
        }
    }
}

#[test]
fn count_exchange_transposes_counts() {
    let results = run_local(3, Duration::from_secs(10), |comm| {
        let sends: Vec<usize> = (0..3).map(|d| 10 * comm.rank() + d).collect();
        comm.exchange_counts(&sends)
    });
    for (me, got) in results.into_iter().enumerate() {
        assert_eq!(got.unwrap(), vec![me, 10 + me, 20 + me]);
    }
}

#[test]
fn wrong_item_count_is_an_error() {
    let results = run_local(1, Duration::from_secs(1), |comm| {
        comm.all_to_all(vec![1, 2])
    });
    assert!(matches!(&results[0], Err(EpError::Transport(m)) if m.contains("one item per rank")));
}

#[test]
fn a_panicking_rank_fails_its_peers_instead_of_hanging() {
    let start = Instant::now();
    let results = run_local(4, Duration::from_secs(30), |comm| {
        comm.all_to_all(vec![0u8; 4])?;
        if comm.rank() == 2 {
            panic!("rank 2 breaks");
        }
        comm.all_to_all(vec![0u8; 4])
    });
    // Well inside the 30 s timeout: peers learn of the panic, they do not wait it out.
    assert!(start.elapsed() < Duration::from_secs(20));
    for (rank, result) in results.iter().enumerate() {
        match result {
            Err(EpError::PeerFailed { rank: 2, reason }) => {
                assert!(reason.contains("panicked"), "rank {rank}: {reason}")
            }
            other => panic!("rank {rank}: expected PeerFailed from rank 2, got {other:?}"),
        }
    }
}

#[test]
fn a_rank_that_returns_early_fails_its_peers() {
    let results = run_local(3, Duration::from_secs(30), |comm| {
        if comm.rank() == 0 {
            return Err(EpError::InvalidConfig("bad input on rank 0".into()));
        }
        comm.all_to_all(vec![(); 3])
    });
    assert!(matches!(results[0], Err(EpError::InvalidConfig(_))));
    for result in &results[1..] {
        assert!(
            matches!(result, Err(EpError::PeerFailed { rank: 0, .. })),
            "{result:?}"
        );
    }
}

#[test]
fn a_silent_rank_times_out_its_peers() {
    let timeout = Duration::from_millis(300);
    let results = run_local(3, timeout, |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_secs(3));
            return Ok(Duration::ZERO);
        }
        let start = Instant::now();
        let err = comm.all_to_all(vec![(); 3]).unwrap_err();
        assert_eq!(
            err,
            EpError::Timeout {
                rank: comm.rank(),
                waiting_for: vec![1],
                after: timeout
            }
        );
        Ok(start.elapsed())
    });
    for rank in [0, 2] {
        let waited = *results[rank].as_ref().unwrap();
        assert!(
            waited >= timeout && waited < Duration::from_secs(3),
            "waited {waited:?}"
        );
    }
}

/// The control channel's messages, on the local transport: words, messages of any
/// length (a second round moves the lengths), the rank-order all-reduce, and a
/// receive length that does not match what was sent.
#[rstest]
fn control_messages_reach_their_ranks(#[values(1, 3)] world: usize) {
    use ep_mesh::Control;
    let results = run_local(world, Duration::from_secs(10), |comm| {
        let control: &dyn Control = &comm;
        let me = control.rank() as u64;
        let words =
            control.all_to_all_words((0..world as u64).map(|d| vec![me, d, 7]).collect(), 3)?;
        // Rank s sends s + d bytes of value s to rank d.
        let messages = control.all_to_all_messages(
            (0..world)
                .map(|d| vec![me as u8; me as usize + d])
                .collect(),
        )?;
        control.barrier()?;
        let values = [me as f32 * 0.1, 1.0 / (me as f32 + 3.0)];
        let sum = control.all_reduce_sum(&values)?;
        Ok((words, messages, sum))
    });
    // Independent answer: the rank-order sum, computed here.
    let mut want_sum = [0.0f32; 2];
    for s in 0..world {
        want_sum[0] += s as f32 * 0.1;
        want_sum[1] += 1.0 / (s as f32 + 3.0);
    }
    for (me, result) in results.into_iter().enumerate() {
        let (words, messages, sum) = result.unwrap();
        for s in 0..world {
            assert_eq!(words[s], vec![s as u64, me as u64, 7]);
            assert_eq!(messages[s], vec![s as u8; s + me]);
        }
        assert_eq!(sum, want_sum.to_vec(), "bitwise the rank-order sum");
    }
}

#[test]
fn a_control_length_mismatch_is_an_error() {
    use ep_mesh::Control;
    let results = run_local(2, Duration::from_secs(10), |comm| {
        // Each rank expects 4 bytes but sends 3.
        comm.all_to_all_bytes(vec![vec![1, 2, 3]; 2], &[4, 4])
    });
    for result in results {
        let err = result.unwrap_err();
        assert!(err.to_string().contains("expected 4 bytes"), "{err}");
    }
}
