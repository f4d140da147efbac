//! The rank-major layout (`EpGroup::dispatch_rank_major`) against the ep-core
//! reference: every received token once, in source-rank order, with its local
//! expert ids and weights; its replay; and its combine, which takes one row per
//! received token and sums each token's rows over the ranks.

mod common;

use burn::tensor::{Int, Tensor};
use burn_ep::{DispatchLayout, EpError, ExpertParallelBackend};
use common::*;
use ep_core::reference::{self, RankBatch};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
use ep_core::EpConfig;
use rstest::rstest;

/// What one rank's rank-major dispatch must return, from the reference's list of
/// received (source rank, token): rows, local ids (`-1` off this rank), weights.
fn expected_rank_major(
    config: &EpConfig,
    batches: &[RankBatch],
    received: &[(usize, usize)],
    rank: usize,
) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let (h, k, local) = (config.hidden_size, config.top_k, config.experts_per_rank());
    let owned = (rank * local) as i64..((rank + 1) * local) as i64;
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for &(src, t) in received {
        let b = &batches[src];
        rows.extend_from_slice(&b.x[t * h..(t + 1) * h]);
        for slot in 0..k {
            let e = b.topk_idx[t * k + slot];
            ids.push(if owned.contains(&e) {
                e - owned.start
            } else {
                -1
            });
            weights.push(b.topk_weights[t * k + slot]);
        }
    }
    (rows, ids, weights)
}

/// Each rank's outcome: rows, ids, weights, expert counts, combine, replay.
type Outcome = (Vec<f32>, Vec<i64>, Vec<f32>, Vec<usize>, Vec<f32>, Vec<f32>);

/// Rank-major dispatch, replay and combine on every rank against the reference.
/// The caller's experts are the stand-ins of `expert_scale`: a received row's
/// output is the sum over its local slots of weight × scale × row, and combine must
/// then give what the expert-major reference combine gives.
fn check_rank_major<B: ExpertParallelBackend>(config: EpConfig, pattern: RoutingPattern) {
    let device: B::Device = Default::default();
    let tokens = 23;
    let sentinels = SentinelPattern::RandomTenth;
    let batches = synthetic_batches(&config, tokens, pattern, sentinels, 5);
    let fresh = fresh_payload(&config, &batches, tokens, pattern, sentinels);
    let (h, k, local) = (config.hidden_size, config.top_k, config.experts_per_rank());
    let expected = reference::dispatch(&config, &batches).unwrap();

    let outcomes: Vec<Outcome> = run_group::<B, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let (x, idx, w) = inputs::<B>(&batches[rank], k, &device);
        let d = group.dispatch_rank_major(x, idx, w)?;
        assert_eq!(d.routing.layout(), DispatchLayout::RankMajor);
        // The stand-in experts: sum over local slots of w × (1 + e/4) × row (no
        // ops on a rank that received nothing: CubeCL refuses zero-size launches).
        let y = match d.rows.dims()[0] {
            0 => d.rows.clone(),
            _ => rank_major_experts(&d.rows, &d.expert_ids, &d.weights, rank * local),
        };
        let combined = group.combine(y, &d.routing)?;
        let new_x = floats::<B>(&fresh[rank].x, [tokens, h], &device);
        let replayed = group.dispatch_cached(new_x, &d.routing)?;
        Ok((
            host(d.rows),
            host_ints(d.expert_ids),
            host(d.weights),
            d.expert_counts,
            host(combined),
            host(replayed),
        ))
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect();

    let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
    let outputs: Vec<Vec<f32>> = expected
        .iter()
        .enumerate()
        .map(|(rank, e)| {
            apply_experts_host(
                &e.rows,
                &config.expert_offsets(&e.routing.expert_counts),
                rank * local,
                h,
            )
        })
        .collect();
    let combined = reference::combine(&config, &batches, &routings, &outputs);
    for (rank, (o, e)) in outcomes.iter().zip(&expected).enumerate() {
        let received = &e.routing.received;
        let (rows, ids, weights) = expected_rank_major(&config, &batches, received, rank);
        assert_eq!(o.0, rows, "rank {rank}: rank-major rows");
        assert_eq!(o.1, ids, "rank {rank}: local expert ids");
        assert_eq!(o.2, weights, "rank {rank}: weights");
        assert_eq!(o.3, e.routing.expert_counts, "rank {rank}: expert counts");
        assert_close(
            &o.4,
            &combined[rank],
            1e-5,
            &format!("rank {rank}: combine"),
        );
        let (replayed, _, _) = expected_rank_major(&config, &fresh, received, rank);
        assert_eq!(o.5, replayed, "rank {rank}: replay moves the new payload");
    }
}

/// The stand-in experts on rank-major rows: each row times the sum over its local
/// slots of weight × `expert_scale(first_expert + id)`.
fn rank_major_experts<B: ExpertParallelBackend>(
    rows: &Tensor<B, 2>,
    ids: &Tensor<B, 2, Int>,
    weights: &Tensor<B, 2>,
    first_expert: usize,
) -> Tensor<B, 2> {
    let scales = ids
        .clone()
        .float()
        .add_scalar(first_expert as f32)
        .mul_scalar(0.25)
        .add_scalar(1.0);
    let local_slot = ids.clone().greater_equal_elem(0).float();
    let row_scale = (scales * weights.clone() * local_slot).sum_dim(1);
    rows.clone() * row_scale
}

#[rstest]
fn rank_major_matches_reference(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(1, 2, 4)] world: usize,
    #[values(
        RoutingPattern::Uniform,
        RoutingPattern::AllToOneRank,
        RoutingPattern::EmptyExperts
    )]
    pattern: RoutingPattern,
) {
    if !runs_here(which) {
        return;
    }
    let config = EpConfig::new(world, 4 * world, 3, 12).with_expert_alignment(4);
    match which {
        Which::NdArray => check_rank_major::<NdArray>(config, pattern),
        Which::Cube => check_rank_major::<Cube>(config, pattern),
        Which::Fused => check_rank_major::<Fused>(config, pattern),
    }
}

/// A combine of a rank-major handle takes one row per received token: expert-major
/// rows (one per slot) are a named mismatch, before any data moves.
#[test]
fn rank_major_combine_names_a_wrong_row_count() {
    let config = EpConfig::new(2, 4, 2, 8);
    let batches = synthetic_batches(
        &config,
        9,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        3,
    );
    let device = Default::default();
    let results = run_group::<NdArray, _, _>(&config, &device, |group| {
        let (x, idx, w) = inputs::<NdArray>(&batches[group.rank()], 2, &device);
        let d = group.dispatch_rank_major(x, idx, w)?;
        let slots: usize = d.expert_counts.iter().sum();
        let received = d.rows.dims()[0];
        assert!(
            slots > received,
            "the case needs a token with two local slots"
        );
        let y = Tensor::zeros([slots, 8], &device);
        Ok(group.combine(y, &d.routing).map(|_| ()))
    });
    for result in results {
        match result.unwrap() {
            Err(EpError::ReplayMismatch { what, .. }) => assert_eq!(what, "y row count"),
            other => panic!("expected a named row-count mismatch, got {other:?}"),
        }
    }
}
