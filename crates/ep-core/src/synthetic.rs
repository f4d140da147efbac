//! Synthetic routings for tests, examples and benchmarks: the patterns every
//! backend is checked on. Deterministic for a given seed.

use crate::reference::RankBatch;
use crate::EpConfig;

/// Which experts the tokens pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingPattern {
    /// Every token picks `top_k` distinct experts uniformly.
    Uniform,
    /// Zipf-like expert popularity: low expert ids are picked far more often.
    Skewed,
    /// Every token picks experts of rank 0 only (slots beyond its experts are `-1`).
    AllToOneRank,
    /// The last rank has no tokens at all.
    NoTokensOnLastRank,
    /// Only even experts are picked: odd experts receive nothing.
    EmptyExperts,
}

/// Where `-1` slots appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentinelPattern {
    /// No `-1` slots.
    None,
    /// About 10% of slots, at random.
    RandomTenth,
    /// About a quarter of the tokens have every slot `-1`.
    WholeRows,
    /// Every slot that names an expert of the last rank becomes `-1`.
    LastRankSlots,
}

/// A small deterministic generator (SplitMix64), so ep-core needs no RNG crate.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream that `seed` starts.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n` (up to a bias of `n / 2^64`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Picks `k` distinct items from `candidates`, each with probability proportional to
/// its weight among those not yet picked.
fn pick_distinct(rng: &mut SplitMix64, candidates: &[(usize, f32)], k: usize) -> Vec<usize> {
    let mut pool = candidates.to_vec();
    let mut picked = Vec::with_capacity(k);
    while picked.len() < k && !pool.is_empty() {
        let total: f32 = pool.iter().map(|c| c.1).sum();
        let mut target = rng.next_f32() * total;
        let mut at = pool.len() - 1;
        for (i, c) in pool.iter().enumerate() {
            if target < c.1 {
                at = i;
                break;
            }
            target -= c.1;
        }
        picked.push(pool.remove(at).0);
    }
    picked
}

/// Expert ids `[tokens, top_k]` for one rank.
pub fn synthetic_topk_idx(
    config: &EpConfig,
    rank: usize,
    tokens: usize,
    pattern: RoutingPattern,
    sentinels: SentinelPattern,
    rng: &mut SplitMix64,
) -> Vec<i64> {
    let (e, k, local) = (config.num_experts, config.top_k, config.experts_per_rank());
    let candidates: Vec<(usize, f32)> = match pattern {
        RoutingPattern::Uniform | RoutingPattern::NoTokensOnLastRank => {
            (0..e).map(|x| (x, 1.0)).collect()
        }
        RoutingPattern::Skewed => (0..e)
            .map(|x| (x, 1.0 / (x as f32 + 1.0).powf(1.2)))
            .collect(),
        RoutingPattern::AllToOneRank => (0..local).map(|x| (x, 1.0)).collect(),
        RoutingPattern::EmptyExperts => (0..e).step_by(2).map(|x| (x, 1.0)).collect(),
    };
    let tokens = if pattern == RoutingPattern::NoTokensOnLastRank && rank + 1 == config.world_size {
        0
    } else {
        tokens
    };
    let last_rank = (config.world_size - 1) * local..e;
    let mut idx = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut slots: Vec<i64> = pick_distinct(rng, &candidates, k)
            .into_iter()
            .map(|x| x as i64)
            .collect();
        slots.resize(k, -1);
        let whole_row = sentinels == SentinelPattern::WholeRows && rng.below(4) == 0;
        for slot in slots.iter_mut() {
            let drop = match sentinels {
                SentinelPattern::None => false,
                SentinelPattern::RandomTenth => rng.below(10) == 0,
                SentinelPattern::WholeRows => whole_row,
                SentinelPattern::LastRankSlots => {
                    *slot >= 0 && last_rank.contains(&(*slot as usize))
                }
            };
            if drop {
                *slot = -1;
            }
        }
        idx.extend(slots);
    }
    idx
}

/// Inputs for every rank of a group: payloads and weights uniform in `[-1, 1)`.
pub fn synthetic_batches(
    config: &EpConfig,
    tokens: usize,
    pattern: RoutingPattern,
    sentinels: SentinelPattern,
    seed: u64,
) -> Vec<RankBatch> {
    let mut rng = SplitMix64::new(seed);
    let hidden = config.hidden_size;
    (0..config.world_size)
        .map(|rank| {
            let topk_idx = synthetic_topk_idx(config, rank, tokens, pattern, sentinels, &mut rng);
            let tokens = topk_idx.len() / config.top_k;
            let mut uniform = |n: usize| (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            RankBatch {
                tokens,
                hidden,
                x: uniform(tokens * hidden),
                topk_weights: uniform(tokens * config.top_k),
                topk_idx,
            }
        })
        .collect()
}
