//! The cuda-peer transport: ranks as threads of one process, rows moving between
//! device buffers by copies (peer copies across GPUs, device copies between ranks
//! sharing one). On a one-GPU host every rank shares device 0, which runs the whole
//! transport path. The full grid runs with `BURN_EP_TRANSPORT=cuda-peer` on the other
//! test binaries; this file checks the transport without the variable.

mod common;

#[cfg(feature = "cuda")]
mod on_cuda {
    use super::common::*;
    use burn_ep::{EpConfig, Transport};
    use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
    use rstest::rstest;

    #[rstest]
    fn cuda_peer_matches_reference(
        #[values(2, 4)] world: usize,
        #[values(1, 8)] alignment: usize,
        #[values(
            RoutingPattern::Uniform,
            RoutingPattern::AllToOneRank,
            RoutingPattern::NoTokensOnLastRank
        )]
        pattern: RoutingPattern,
        #[values(SentinelPattern::None, SentinelPattern::RandomTenth)] sentinels: SentinelPattern,
    ) {
        let config = EpConfig::new(world, 4 * world, 3, 36).with_expert_alignment(alignment);
        let batches = synthetic_batches(&config, 37, pattern, sentinels, 4);
        let fresh = fresh_payload(&config, &batches, 37, pattern, sentinels);
        check_against_reference_on::<Cube>(
            Transport::CudaPeer,
            Default::default(),
            config,
            batches,
            fresh,
        );
    }

    /// The tensor-op fallback has no device path: the cuda-peer transport moves its
    /// rows as host data through the control channel, with the same results.
    #[test]
    fn cuda_peer_serves_host_backends() {
        let config = EpConfig::new(2, 8, 2, 5);
        let (p, s) = (RoutingPattern::Skewed, SentinelPattern::RandomTenth);
        let batches = synthetic_batches(&config, 11, p, s, 6);
        let fresh = fresh_payload(&config, &batches, 11, p, s);
        check_against_reference_on::<NdArray>(
            Transport::CudaPeer,
            Default::default(),
            config,
            batches,
            fresh,
        );
    }
}

/// Without the `cuda` feature the device transports (cuda-peer, nccl, hierarchical)
/// are refused by name, not silently replaced.
#[cfg(not(feature = "cuda"))]
#[test]
fn device_transports_need_the_cuda_feature() {
    use burn_ep::{run_ranks, EpConfig, EpError, Transport};
    use common::{NdArray, TIMEOUT};
    let config = EpConfig::new(2, 4, 1, 3);
    for transport in [
        Transport::CudaPeer,
        Transport::Nccl,
        Transport::Hierarchical,
    ] {
        let result = run_ranks::<NdArray, (), _, _>(
            transport,
            &config,
            TIMEOUT,
            |_, _| Default::default(),
            |_| Ok(()),
        );
        match result {
            Err(EpError::InvalidConfig(msg)) => {
                assert!(
                    msg.contains(&format!("the {transport} transport needs")),
                    "{msg}"
                );
                assert!(msg.contains("cuda"), "{msg}");
            }
            other => panic!(
                "{transport}: expected InvalidConfig, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
