//! The plain-Rust reference of dispatch, cached dispatch and combine over `W` ranks
//! held in memory. It is the test oracle: it defines the contract (the book's *The
//! contract*: sentinels, one copy per rank, deterministic order, expert-major output with
//! alignment or uniform padding, weighted combine, replay) in the most direct code possible,
//! and shares no layout code with the backends.
//!
//! Floating-point sums are taken in the order the backends use, so f32 results
//! compare exactly: a rank's partial sums its local experts in ascending order, and
//! a token sums the partials it gets back in ascending rank order, both from zero.

use std::collections::HashMap;

use crate::{padding, validate, EpConfig, EpResult};

/// One rank's inputs, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RankBatch {
    /// Tokens `T` of this rank.
    pub tokens: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// `[tokens, hidden]`
    pub x: Vec<f32>,
    /// `[tokens, top_k]`, `-1` for an empty slot
    pub topk_idx: Vec<i64>,
    /// `[tokens, top_k]`
    pub topk_weights: Vec<f32>,
}

/// What one rank received, in the reference's own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceRouting {
    /// The received rows in order: (source rank, source token).
    pub received: Vec<(usize, usize)>,
    /// Every expert-major row: (source rank, source token, top-k slot), or `None`
    /// for an alignment pad row.
    pub rows: Vec<Option<(usize, usize, usize)>>,
    /// Rows per local expert, before padding.
    pub expert_counts: Vec<usize>,
}

/// One rank's dispatch result.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceDispatch {
    /// `[padded rows, hidden]`, expert-major, pad rows zero.
    pub rows: Vec<f32>,
    /// The top-k weight of each expert-major row, zero on pad rows.
    pub weights: Vec<f32>,
    /// Where every row came from and went.
    pub routing: ReferenceRouting,
}

/// Dispatch over all ranks at once. Fails on the first bad input of any rank.
pub fn dispatch(config: &EpConfig, batches: &[RankBatch]) -> EpResult<Vec<ReferenceDispatch>> {
    for (rank, batch) in batches.iter().enumerate() {
        let config = config.clone().with_rank(rank);
        validate::check_token_count(&config, batch.tokens)?;
        validate::check_topk_idx(&config, &batch.topk_idx)?;
    }
    let routings: Vec<ReferenceRouting> = (0..config.world_size)
        .map(|dest| routing_of(config, batches, dest))
        .collect();
    let xs: Vec<&[f32]> = batches.iter().map(|b| b.x.as_slice()).collect();
    Ok(routings
        .into_iter()
        .map(|routing| {
            let rows = gather_rows(&routing, &xs, config.hidden_size);
            let weights = routing
                .rows
                .iter()
                .map(|row| match *row {
                    Some((src, token, slot)) => {
                        batches[src].topk_weights[token * config.top_k + slot]
                    }
                    None => 0.0,
                })
                .collect();
            ReferenceDispatch {
                rows,
                weights,
                routing,
            }
        })
        .collect())
}

fn routing_of(config: &EpConfig, batches: &[RankBatch], dest: usize) -> ReferenceRouting {
    let k = config.top_k;
    let local = config.experts_per_rank();
    let owned = dest * local..(dest + 1) * local;
    let mut received = Vec::new();
    for (src, batch) in batches.iter().enumerate() {
        for token in 0..batch.tokens {
            let slots = &batch.topk_idx[token * k..(token + 1) * k];
            if slots
                .iter()
                .any(|&e| e >= 0 && owned.contains(&(e as usize)))
            {
                received.push((src, token));
            }
        }
    }
    let groups: Vec<Vec<(usize, usize, usize)>> = owned
        .map(|expert| {
            let mut group = Vec::new();
            for (src, batch) in batches.iter().enumerate() {
                for token in 0..batch.tokens {
                    for slot in 0..k {
                        if batch.topk_idx[token * k + slot] == expert as i64 {
                            group.push((src, token, slot));
                        }
                    }
                }
            }
            group
        })
        .collect();
    let expert_counts: Vec<usize> = groups.iter().map(Vec::len).collect();
    let alignment = config.expert_alignment;
    let uniform = config
        .uniform_expert_rows
        .then(|| padding::uniform_group_rows(&expert_counts, alignment))
        .flatten();
    let mut rows = Vec::new();
    for group in groups {
        let padded = uniform.unwrap_or(group.len().div_ceil(alignment) * alignment);
        let start = rows.len();
        rows.extend(group.into_iter().map(Some));
        rows.resize(start + padded, None);
    }
    ReferenceRouting {
        received,
        rows,
        expert_counts,
    }
}

fn gather_rows(routing: &ReferenceRouting, xs: &[&[f32]], hidden: usize) -> Vec<f32> {
    let mut out = vec![0.0; routing.rows.len() * hidden];
    for (row, origin) in routing.rows.iter().enumerate() {
        if let Some((src, token, _)) = *origin {
            out[row * hidden..(row + 1) * hidden]
                .copy_from_slice(&xs[src][token * hidden..(token + 1) * hidden]);
        }
    }
    out
}

/// Cached dispatch: the same routing moving a new payload (`xs[rank]` is `[tokens, hidden]`).
pub fn dispatch_cached(
    routings: &[ReferenceRouting],
    xs: &[&[f32]],
    hidden: usize,
) -> Vec<Vec<f32>> {
    routings
        .iter()
        .map(|routing| gather_rows(routing, xs, hidden))
        .collect()
}

/// Combine: `expert_outputs[rank]` is `[padded rows, hidden]` in that rank's
/// expert-major layout. Returns each rank's `[tokens, hidden]`: for every token, the
/// sum over its slots of weight × the output of that slot's expert.
pub fn combine(
    config: &EpConfig,
    batches: &[RankBatch],
    routings: &[ReferenceRouting],
    expert_outputs: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    let hidden = config.hidden_size;
    let k = config.top_k;
    let local = config.experts_per_rank();
    // (source rank, token, global expert) -> expert-major row, per destination rank.
    let row_of: Vec<HashMap<(usize, usize, usize), usize>> = routings
        .iter()
        .map(|routing| {
            routing
                .rows
                .iter()
                .enumerate()
                .filter_map(|(row, origin)| {
                    origin.map(|(src, token, slot)| {
                        let expert = batches[src].topk_idx[token * k + slot] as usize;
                        ((src, token, expert), row)
                    })
                })
                .collect()
        })
        .collect();
    batches
        .iter()
        .enumerate()
        .map(|(src, batch)| {
            let mut out = vec![0.0f32; batch.tokens * hidden];
            for token in 0..batch.tokens {
                let slots = &batch.topk_idx[token * k..(token + 1) * k];
                for dest in 0..config.world_size {
                    let mut partial = vec![0.0f32; hidden];
                    let mut reached = false;
                    for expert in dest * local..(dest + 1) * local {
                        let Some(slot) = slots.iter().position(|&e| e == expert as i64) else {
                            continue;
                        };
                        reached = true;
                        let weight = batch.topk_weights[token * k + slot];
                        let row = row_of[dest][&(src, token, expert)];
                        let y = &expert_outputs[dest][row * hidden..(row + 1) * hidden];
                        for (p, &v) in partial.iter_mut().zip(y) {
                            *p += weight * v;
                        }
                    }
                    if reached {
                        for (o, p) in out[token * hidden..(token + 1) * hidden]
                            .iter_mut()
                            .zip(&partial)
                        {
                            *o += p;
                        }
                    }
                }
            }
            out
        })
        .collect()
}
