//! Dispatch, cached dispatch and combine on every backend, against the ep-core
//! reference, over the routing grid of DESIGN.md. f32 results must be equal exactly.

mod common;

use burn_ep::ExpertParallelBackend;
use common::*;
use ep_core::reference::{self, RankBatch};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
use ep_core::EpConfig;
use rstest::rstest;

/// What one rank saw: expert-major rows, counts, weights, combine output, replay rows.
type RankOutcome = (
    Vec<f32>,
    Vec<usize>,
    Vec<usize>,
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
);

fn check_against_reference<B: ExpertParallelBackend>(
    device: B::Device,
    config: EpConfig,
    batches: Vec<RankBatch>,
    fresh: Vec<RankBatch>,
) {
    let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
    let expected = reference::dispatch(&config, &batches).unwrap();

    let outcomes: Vec<RankOutcome> = run_group::<B, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let (x, idx, w) = inputs::<B>(&batches[rank], k, &device);
        let d = group.dispatch(x, idx, w)?;
        let offsets = d.routing.expert_offsets().to_vec();
        let y = apply_experts(d.rows.clone(), &offsets, rank * local);
        let combined = group.combine(y, &d.routing)?;
        let new_x = floats::<B>(&fresh[rank].x, [fresh[rank].tokens, h], &device);
        let replayed = group.dispatch_cached(new_x, &d.routing)?;
        Ok((
            host(d.rows),
            d.expert_counts,
            offsets,
            host(d.routing.weights()),
            host(combined),
            host(replayed),
        ))
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect();

    let mut expert_outputs = Vec::new();
    for (rank, ((rows, counts, offsets, weights, _, _), e)) in
        outcomes.iter().zip(&expected).enumerate()
    {
        assert_eq!(
            counts, &e.routing.expert_counts,
            "rank {rank}: expert counts"
        );
        assert_eq!(rows, &e.rows, "rank {rank}: expert-major rows");
        assert_eq!(weights, &e.weights, "rank {rank}: row weights");
        expert_outputs.push(apply_experts_host(&e.rows, offsets, rank * local, h));
    }
    let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
    let combined = reference::combine(&config, &batches, &routings, &expert_outputs);
    let xs: Vec<&[f32]> = fresh.iter().map(|b| b.x.as_slice()).collect();
    let replayed = reference::dispatch_cached(&routings, &xs, h);
    for (rank, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.4, combined[rank], "rank {rank}: combine");
        assert_eq!(
            outcome.5, replayed[rank],
            "rank {rank}: replay must move the new payload"
        );
    }
}

pub fn check_grid(
    which: Which,
    config: EpConfig,
    tokens: usize,
    pattern: RoutingPattern,
    sentinels: SentinelPattern,
) {
    let batches = synthetic_batches(&config, tokens, pattern, sentinels, 11);
    // Same routing, new payload: only `x` differs (the pattern fixes the token counts).
    let fresh: Vec<RankBatch> = synthetic_batches(&config, tokens, pattern, sentinels, 12)
        .into_iter()
        .zip(&batches)
        .map(|(f, b)| RankBatch {
            x: f.x,
            ..b.clone()
        })
        .collect();
    match which {
        Which::NdArray => {
            check_against_reference::<NdArray>(Default::default(), config, batches, fresh)
        }
        Which::Wgpu => check_against_reference::<Wgpu>(Default::default(), config, batches, fresh),
    }
}

#[rstest]
fn routing_grid(
    #[values(Which::NdArray, Which::Wgpu)] which: Which,
    #[values(2, 4)] world: usize,
    #[values(1, 8)] alignment: usize,
    #[values(
        RoutingPattern::Uniform,
        RoutingPattern::Skewed,
        RoutingPattern::AllToOneRank,
        RoutingPattern::NoTokensOnLastRank,
        RoutingPattern::EmptyExperts
    )]
    pattern: RoutingPattern,
    #[values(
        SentinelPattern::None,
        SentinelPattern::RandomTenth,
        SentinelPattern::WholeRows,
        SentinelPattern::LastRankSlots
    )]
    sentinels: SentinelPattern,
) {
    let config = EpConfig::new(world, 4 * world, 3, 12).with_expert_alignment(alignment);
    check_grid(which, config, 29, pattern, sentinels);
}

#[rstest]
fn single_rank_and_wide_top_k(
    #[values(Which::NdArray, Which::Wgpu)] which: Which,
    #[values(1, 2)] world: usize,
) {
    // top_k equal to the number of experts: every token reaches every expert.
    let config = EpConfig::new(world, 2 * world, 2 * world, 7).with_expert_alignment(16);
    check_grid(
        which,
        config,
        9,
        RoutingPattern::Uniform,
        SentinelPattern::RandomTenth,
    );
}
