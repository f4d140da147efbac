//! The contract (the book's *The contract*), checked on the reference itself.

use ep_core::padding::uniform_group_rows;
use ep_core::reference::{self, RankBatch};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
use ep_core::{EpConfig, EpError};
use rstest::rstest;

fn config(world: usize, alignment: usize) -> EpConfig {
    EpConfig::new(world, 4 * world, 3, 5).with_expert_alignment(alignment)
}

#[rstest]
fn contract_holds(
    #[values(1, 2, 4)] world: usize,
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
    #[values(false, true)] uniform: bool,
) {
    let config = config(world, alignment).with_uniform_expert_rows(uniform);
    let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
    let batches = synthetic_batches(&config, 37, pattern, sentinels, 7);
    let out = reference::dispatch(&config, &batches).unwrap();

    for (dest, d) in out.iter().enumerate() {
        let owned = |e: i64| e >= 0 && e as usize / local == dest;
        // One copy per rank, ordered by source rank then token, sentinels skipped.
        let expected: Vec<(usize, usize)> = batches
            .iter()
            .enumerate()
            .flat_map(|(src, b)| {
                (0..b.tokens)
                    .filter(|&t| b.topk_idx[t * k..(t + 1) * k].iter().any(|&e| owned(e)))
                    .map(move |t| (src, t))
            })
            .collect();
        assert_eq!(d.routing.received, expected);

        // Expert-major: groups padded to the alignment, or all to one count where
        // asked and not too uneven; ordered within, pad rows zero.
        let counts = &d.routing.expert_counts;
        let one_count = uniform
            .then(|| uniform_group_rows(counts, alignment))
            .flatten();
        if uniform && pattern == RoutingPattern::Uniform && sentinels == SentinelPattern::None {
            assert!(one_count.is_some(), "even routing pads to one count");
        }
        let mut start = 0;
        for (j, &count) in d.routing.expert_counts.iter().enumerate() {
            let expert = (dest * local + j) as i64;
            let group = &d.routing.rows[start..start + count];
            let mut previous = None;
            for origin in group {
                let (src, token, slot) = origin.expect("real row inside a group");
                assert_eq!(batches[src].topk_idx[token * k + slot], expert);
                assert!(previous < Some((src, token)), "rows out of order");
                previous = Some((src, token));
            }
            let routed: usize = batches
                .iter()
                .map(|b| b.topk_idx.iter().filter(|&&e| e == expert).count())
                .sum();
            assert_eq!(count, routed);
            let padded = one_count.unwrap_or(count.div_ceil(alignment) * alignment);
            assert!(padded >= count);
            for row in start + count..start + padded {
                assert_eq!(d.routing.rows[row], None);
                assert!(d.rows[row * h..(row + 1) * h].iter().all(|&v| v == 0.0));
                assert_eq!(d.weights[row], 0.0);
            }
            start += padded;
        }
        assert_eq!(start, d.routing.rows.len());
    }

    // Weighted combine with identity experts: each token gets sum_k w_k x over its
    // non-sentinel slots; a token with only sentinels gets zero.
    let outputs: Vec<Vec<f32>> = out.iter().map(|d| d.rows.clone()).collect();
    let routings: Vec<_> = out.iter().map(|d| d.routing.clone()).collect();
    let combined = reference::combine(&config, &batches, &routings, &outputs);
    for (b, y) in batches.iter().zip(&combined) {
        for t in 0..b.tokens {
            for c in 0..h {
                let expect: f32 = (0..k)
                    .filter(|&s| b.topk_idx[t * k + s] >= 0)
                    .map(|s| b.topk_weights[t * k + s] * b.x[t * h + c])
                    .sum();
                assert!((y[t * h + c] - expect).abs() < 1e-5, "token {t} col {c}");
            }
            if b.topk_idx[t * k..(t + 1) * k].iter().all(|&e| e == -1) {
                assert!(y[t * h..(t + 1) * h].iter().all(|&v| v == 0.0));
            }
        }
    }
}

#[test]
fn replay_moves_the_new_payload() {
    let config = config(4, 8);
    let batches = synthetic_batches(
        &config,
        20,
        RoutingPattern::Uniform,
        SentinelPattern::RandomTenth,
        1,
    );
    let first = reference::dispatch(&config, &batches).unwrap();
    let fresh = synthetic_batches(
        &config,
        20,
        RoutingPattern::Uniform,
        SentinelPattern::RandomTenth,
        99,
    );
    let moved: Vec<RankBatch> = batches
        .iter()
        .zip(&fresh)
        .map(|(b, f)| RankBatch {
            x: f.x.clone(),
            ..b.clone()
        })
        .collect();
    let again = reference::dispatch(&config, &moved).unwrap();
    let routings: Vec<_> = first.iter().map(|d| d.routing.clone()).collect();
    let xs: Vec<&[f32]> = moved.iter().map(|b| b.x.as_slice()).collect();
    let replayed = reference::dispatch_cached(&routings, &xs, config.hidden_size);
    for (r, a) in replayed.iter().zip(&again) {
        assert_eq!(r, &a.rows);
    }
    assert_ne!(
        replayed[0], first[0].rows,
        "replay must not return the old payload"
    );
}

#[test]
fn bad_ids_are_errors() {
    let config = config(2, 1);
    let mut batches = synthetic_batches(
        &config,
        4,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        3,
    );
    batches[1].topk_idx[5] = 8;
    assert_eq!(
        reference::dispatch(&config, &batches).unwrap_err(),
        EpError::ExpertIdOutOfRange {
            rank: 1,
            token: 1,
            slot: 2,
            id: 8,
            num_experts: 8
        }
    );
}

#[test]
fn too_many_tokens_is_an_error() {
    let config = config(2, 1).with_max_tokens_per_rank(3);
    let batches = synthetic_batches(
        &config,
        4,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        3,
    );
    assert!(matches!(
        reference::dispatch(&config, &batches),
        Err(EpError::TooManyTokens {
            rank: 0,
            tokens: 4,
            max: 3
        })
    ));
}
