//! A rank whose device fails: its group calls end with an error that carries the
//! driver's message, and its peers learn which rank failed and why at once, not
//! after the timeout.
//!
//! The fault is injected the way users meet it: a launch the driver refuses (a
//! zero-size grid, which CUDA rejects and wgpu accepts), so the case runs on CUDA.

mod common;

use std::sync::Barrier;
use std::time::Duration;

use burn::tensor::Tensor;
use burn_ep::{run_ranks, EpConfig, EpError, EpGroup, RunOptions};
use common::*;
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

/// Long enough that an answer given by the timeout would fail the test run's own
/// limits: the peers must hear of the fault at once.
const PATIENT: Duration = Duration::from_secs(600);

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs CUDA: the injected fault is a zero-size launch, which wgpu accepts"
)]
fn a_rank_whose_device_failed_names_the_cause_to_everyone() {
    type B = Cube;
    let config = EpConfig::new(2, 4, 2, 8);
    let batches = synthetic_batches(
        &config,
        6,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        3,
    );
    let device: <B as burn::tensor::backend::BackendTypes>::Device = Default::default();
    // Rank 1 stays in the group until rank 0 has its answer, so that what rank 0
    // hears is the fault itself, not the runner's notice that rank 1 has left.
    let answered = Barrier::new(2);
    let results = run_ranks(
        transport(),
        &RunOptions::default().with_timeout(PATIENT),
        &config,
        |_, _| device.clone(),
        |group: EpGroup<B>| {
            let rank = group.rank();
            let (x, idx, w) = inputs::<B>(&batches[rank], config.top_k, &device);
            if rank == 1 {
                // The fault: the driver refuses a grid of zero blocks.
                let _ = Tensor::<B, 2>::ones([0, 8], &device);
            }
            let first = group
                .dispatch(x.clone(), idx.clone(), w.clone())
                .map(|_| ());
            let later = group.dispatch(x, idx, w).map(|_| ());
            answered.wait();
            Ok((first, later))
        },
    )
    .unwrap();
    let mut results = results.into_iter().map(|r| r.unwrap());
    let (peer_first, peer_later) = results.next().unwrap();
    let (own_first, own_later) = results.next().unwrap();

    for (what, result) in [("first", &own_first), ("later", &own_later)] {
        match result {
            Err(EpError::DeviceFailed { rank: 1, reason }) => assert!(
                reason.contains("CUDA_ERROR_INVALID_VALUE"),
                "rank 1's {what} call: the driver's message is missing: {reason}"
            ),
            other => panic!("rank 1's {what} call: expected DeviceFailed, got {other:?}"),
        }
    }
    for (what, result) in [("first", &peer_first), ("later", &peer_later)] {
        match result {
            Err(EpError::PeerFailed { rank: 1, reason }) => assert!(
                reason.contains("CUDA_ERROR_INVALID_VALUE"),
                "rank 0's {what} call: the cause is missing: {reason}"
            ),
            other => panic!("rank 0's {what} call: expected PeerFailed by rank 1, got {other:?}"),
        }
    }
}
