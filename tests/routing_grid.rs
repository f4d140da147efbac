//! Dispatch, cached dispatch and combine on every backend, against the ep-core
//! reference, over a grid of routings (patterns, sentinels, ranks, alignments). f32 results must be
//! equal exactly.

mod common;

use common::*;
use ep_core::reference::RankBatch;
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
use ep_core::EpConfig;
use rstest::rstest;

pub fn check_grid(
    which: Which,
    config: EpConfig,
    tokens: usize,
    pattern: RoutingPattern,
    sentinels: SentinelPattern,
) {
    if !runs_here(which) {
        return;
    }
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
        Which::Cube => check_against_reference::<Cube>(Default::default(), config, batches, fresh),
        Which::Fused => {
            check_against_reference::<Fused>(Default::default(), config, batches, fresh)
        }
    }
}

#[rstest]
fn routing_grid(
    #[values(Which::NdArray, Which::Cube)] which: Which,
    #[values(2, 4, 8)] world: usize,
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

/// Uniform expert groups (every local expert's rows padded to one count): the rows,
/// weights, combine and replay against the reference, which pads the same way.
#[rstest]
fn uniform_expert_rows(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(2, 4)] world: usize,
    #[values(1, 8)] alignment: usize,
    #[values(
        RoutingPattern::Uniform,
        RoutingPattern::Skewed,
        RoutingPattern::AllToOneRank,
        RoutingPattern::EmptyExperts
    )]
    pattern: RoutingPattern,
) {
    let config = EpConfig::new(world, 4 * world, 3, 12)
        .with_expert_alignment(alignment)
        .with_uniform_expert_rows(true);
    check_grid(which, config, 29, pattern, SentinelPattern::RandomTenth);
}

#[rstest]
fn single_rank_and_wide_top_k(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
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
