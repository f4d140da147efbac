//! The nccl and hierarchical transports on the GPUs of this host. NCCL puts each
//! rank on its own GPU, so the group sizes follow the host: on one GPU a group has
//! one rank (the loopback cases send its own rows through NCCL too), and every case
//! with more ranks than GPUs says so and returns. The
//! multi-process programs are `examples/nccl_check.rs` and `scripts/two_node_nccl.sh`.

mod common;

#[cfg(feature = "cuda")]
mod on_cuda {
    use std::time::{Duration, Instant};

    use super::common::*;
    use burn_ep::profiling::Control;
    use burn_ep::{run_ranks, EpConfig, EpError, Transport};
    use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
    use ep_mesh::nccl::{nccl_unique_id, run_nccl, NcclComm};
    use rstest::rstest;

    fn fits(world: usize) -> bool {
        let gpus = ep_mesh::cuda_device_count().unwrap();
        if world > gpus {
            skip(format!(
                "{world} ranks need {world} GPUs, this host has {gpus}"
            ));
        }
        world <= gpus
    }

    #[rstest]
    fn nccl_and_hierarchical_match_reference(
        #[values(Transport::Nccl, Transport::Hierarchical)] transport: Transport,
        #[values(1, 2, 4, 8)] world: usize,
        #[values(
            RoutingPattern::Uniform,
            RoutingPattern::AllToOneRank,
            RoutingPattern::NoTokensOnLastRank
        )]
        pattern: RoutingPattern,
        #[values(SentinelPattern::None, SentinelPattern::RandomTenth)] sentinels: SentinelPattern,
        #[values(false, true)] loopback: bool,
    ) {
        if !fits(world) {
            return;
        }
        let config = EpConfig::new(world, 4 * world, 3, 36).with_expert_alignment(8);
        let batches = synthetic_batches(&config, 37, pattern, sentinels, 4);
        let fresh = fresh_payload(&config, &batches, 37, pattern, sentinels);
        let options = options().with_nccl_loopback(loopback);
        check_against_reference_with::<Cube>(
            transport,
            &options,
            Default::default(),
            config,
            batches,
            fresh,
        );
    }

    /// The control channel through NCCL's device buffer: words, messages of any
    /// length, a barrier and the rank-order all-reduce, against answers computed here.
    #[test]
    fn control_messages_cross_nccl() {
        let world = ep_mesh::cuda_device_count().unwrap().min(4);
        let results = run_nccl(world, TIMEOUT, |comm| {
            let me = comm.rank() as u64;
            let words =
                comm.all_to_all_words((0..world as u64).map(|d| vec![me, d]).collect(), 2)?;
            let messages = comm
                .all_to_all_messages((0..world).map(|d| vec![me as u8; 1000 * d + 3]).collect())?;
            comm.barrier()?;
            let sum = comm.all_reduce_sum(&[me as f32 + 0.5, -1.0])?;
            Ok((words, messages, sum))
        })
        .unwrap();
        let want_sum = vec![
            (0..world).map(|s| s as f32 + 0.5).sum::<f32>(),
            -(world as f32),
        ];
        for (me, result) in results.into_iter().enumerate() {
            let (words, messages, sum) = result.unwrap();
            for s in 0..world {
                assert_eq!(words[s], vec![s as u64, me as u64]);
                assert_eq!(messages[s], vec![s as u8; 1000 * me + 3]);
            }
            assert_eq!(sum, want_sum);
        }
    }

    /// NCCL refuses two ranks on one GPU; the transport says so before NCCL does.
    #[test]
    fn more_ranks_than_gpus_is_refused_by_name() {
        let gpus = ep_mesh::cuda_device_count().unwrap();
        let config = EpConfig::new(gpus + 1, 2 * (gpus + 1), 1, 4);
        let err = run_ranks::<Cube, (), _, _>(
            Transport::Nccl,
            &options(),
            &config,
            |_, _| Default::default(),
            |_| Ok(()),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("its own GPU"), "{err}");
    }

    /// A rank that never joins: the communicator's start-up times out within the
    /// configured timeout (and is aborted) instead of waiting forever. Runs on one GPU.
    #[test]
    fn a_rank_that_never_joins_times_out() {
        let id = nccl_unique_id().unwrap();
        let timeout = Duration::from_secs(3);
        let start = Instant::now();
        let err = NcclComm::init(&id, 2, 0, 0, timeout)
            .err()
            .expect("no peer");
        let waited = start.elapsed();
        assert!(
            matches!(&err, EpError::Timeout { rank: 0, waiting_for, .. } if waiting_for == &vec![1]),
            "{err:?}"
        );
        assert!(waited < timeout + Duration::from_secs(10), "{waited:?}");
    }

    /// A rank that leaves early: its peers' pending calls fail within the timeout,
    /// and later calls fail at once on the aborted communicator. Needs two GPUs.
    #[test]
    fn a_rank_that_leaves_fails_its_peers_in_time() {
        if !fits(2) {
            return;
        }
        let timeout = Duration::from_secs(5);
        let results = run_nccl(2, timeout, |comm| {
            comm.barrier()?;
            if comm.rank() == 1 {
                return Ok(Duration::ZERO); // leaves: its communicator is destroyed
            }
            let start = Instant::now();
            let first = comm.barrier();
            let second = comm.barrier();
            assert!(first.is_err(), "a barrier without the peer cannot succeed");
            assert!(matches!(second, Err(EpError::Aborted { .. })), "{second:?}");
            Ok(start.elapsed())
        })
        .unwrap();
        let waited = results[0].as_ref().unwrap();
        assert!(*waited < timeout + Duration::from_secs(10), "{waited:?}");
    }
}

/// Without the `cuda` feature a multi-process launch is refused by name (the
/// in-process NCCL transports are checked with cuda-peer in `cuda_peer.rs`).
#[cfg(not(feature = "cuda"))]
#[test]
fn launch_needs_the_cuda_feature() {
    use burn_ep::{launch, EpConfig, EpError};
    use common::{options, NdArray};
    let config = EpConfig::new(2, 4, 1, 3);
    let launched =
        launch::<NdArray, (), _, _>(&options(), &config, |_, _| Default::default(), |_| Ok(()));
    assert!(
        matches!(&launched, Err(EpError::InvalidConfig(m)) if m.contains("NCCL")),
        "{:?}",
        launched.map(|_| ())
    );
}
