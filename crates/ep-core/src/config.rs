//! The configuration of an expert-parallel group.

use serde::{Deserialize, Serialize};

use crate::{EpError, EpResult};

/// Everything a group needs to know to move tokens: who it is, how experts are
/// placed, and the limits its buffers are sized for.
///
/// Experts are owned in contiguous blocks: expert `e` lives on rank
/// `e / (num_experts / world_size)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpConfig {
    /// Ranks `W` of the group.
    pub world_size: usize,
    /// This rank's number, `0..world_size` (set by the runner for each rank).
    pub rank: usize,
    /// Experts `E` of the whole group, `E / W` on each rank.
    pub num_experts: usize,
    /// Experts each token goes to (`K`).
    pub top_k: usize,
    /// Hidden size `H` of the tokens.
    pub hidden_size: usize,
    /// The most tokens a rank may dispatch in one call ([`EpError::TooManyTokens`]
    /// past it).
    pub max_tokens_per_rank: usize,
    /// Each expert's group of rows is padded to a multiple of this (1, 8, 16, 128 ...).
    pub expert_alignment: usize,
    /// Sequence-parallel degree: the token dimension is padded to a multiple of it.
    pub sp_size: usize,
    /// Pad every local expert's group to one row count (see
    /// [`EpConfig::expert_offsets`]), so that the experts run as one batched product
    /// on `[local experts, rows, hidden]`.
    #[serde(default)]
    pub uniform_expert_rows: bool,
}

impl EpConfig {
    /// A config with alignment 1, no sequence parallelism and room for 4096 tokens per rank.
    pub fn new(world_size: usize, num_experts: usize, top_k: usize, hidden_size: usize) -> Self {
        Self {
            world_size,
            rank: 0,
            num_experts,
            top_k,
            hidden_size,
            max_tokens_per_rank: 4096,
            expert_alignment: 1,
            sp_size: 1,
            uniform_expert_rows: false,
        }
    }

    /// This config as rank `rank` holds it.
    pub fn with_rank(mut self, rank: usize) -> Self {
        self.rank = rank;
        self
    }

    /// Room for `max` tokens per rank and call.
    pub fn with_max_tokens_per_rank(mut self, max: usize) -> Self {
        self.max_tokens_per_rank = max;
        self
    }

    /// Each expert's rows padded to a multiple of `alignment`.
    pub fn with_expert_alignment(mut self, alignment: usize) -> Self {
        self.expert_alignment = alignment;
        self
    }

    /// Tokens padded to a multiple of `sp_size` (sequence parallelism).
    pub fn with_sp_size(mut self, sp_size: usize) -> Self {
        self.sp_size = sp_size;
        self
    }

    /// Every local expert padded to one row count (see [`EpConfig::uniform_expert_rows`]).
    pub fn with_uniform_expert_rows(mut self, uniform: bool) -> Self {
        self.uniform_expert_rows = uniform;
        self
    }

    /// Checks that the numbers describe a group that can exist.
    pub fn validate(&self) -> EpResult<()> {
        let bad = |msg: String| Err(EpError::InvalidConfig(msg));
        if self.world_size == 0 {
            return bad("world_size must be at least 1".into());
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "rank {} is outside a world of {}",
                self.rank, self.world_size
            ));
        }
        if self.num_experts == 0 || !self.num_experts.is_multiple_of(self.world_size) {
            return bad(format!(
                "num_experts ({}) must be a positive multiple of world_size ({})",
                self.num_experts, self.world_size
            ));
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad(format!(
                "top_k ({}) must be in 1..={}",
                self.top_k, self.num_experts
            ));
        }
        if self.hidden_size == 0 {
            return bad("hidden_size must be at least 1".into());
        }
        if self.expert_alignment == 0 {
            return bad("expert_alignment must be at least 1".into());
        }
        if self.sp_size == 0 {
            return bad("sp_size must be at least 1".into());
        }
        Ok(())
    }

    /// Experts each rank holds, `E / W`.
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.world_size
    }

    /// The rank that owns global expert `expert`.
    pub fn rank_of_expert(&self, expert: usize) -> usize {
        expert / self.experts_per_rank()
    }

    /// The index of global expert `expert` among its owner's experts.
    pub fn local_expert(&self, expert: usize) -> usize {
        expert % self.experts_per_rank()
    }

    /// `count` rounded up to the expert alignment.
    pub fn aligned(&self, count: usize) -> usize {
        count.div_ceil(self.expert_alignment) * self.expert_alignment
    }

    /// Where each local expert's group starts in the expert-major rows, and where
    /// the last ends (`counts.len() + 1` entries): groups of `counts` rows, each
    /// padded to the expert alignment, or all to one count where the config asks
    /// for uniform groups and [`crate::padding::uniform_group_rows`] gives one.
    pub fn expert_offsets(&self, counts: &[usize]) -> Vec<usize> {
        let uniform = self
            .uniform_expert_rows
            .then(|| crate::padding::uniform_group_rows(counts, self.expert_alignment))
            .flatten();
        let mut offsets = vec![0];
        for &count in counts {
            let rows = uniform.unwrap_or_else(|| self.aligned(count));
            offsets.push(offsets.last().unwrap() + rows);
        }
        offsets
    }
}
