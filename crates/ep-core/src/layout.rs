//! Host-side layout arithmetic: where each token is sent, and where each received
//! row lands in the expert-major output. Backends without kernels (and the handle's
//! bookkeeping) use it; the reference in `reference.rs` is written independently.

use crate::EpConfig;

/// The send side of one rank's dispatch: the result of the layout and slots steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendLayout {
    /// Per destination rank, the tokens sent there, ascending (a token goes once).
    pub tokens_per_rank: Vec<Vec<usize>>,
    /// Per destination rank, for each sent token, its `top_k` slots as the
    /// destination's local expert ids, `-1` where the slot's expert is elsewhere.
    pub local_experts: Vec<Vec<i32>>,
    /// How many (token, expert) pairs each global expert gets from this rank.
    pub tokens_per_expert: Vec<usize>,
}

impl SendLayout {
    /// Computes the layout from validated `[tokens, top_k]` ids.
    pub fn new(config: &EpConfig, topk_idx: &[i64]) -> Self {
        let k = config.top_k;
        let world = config.world_size;
        let mut tokens_per_rank = vec![Vec::new(); world];
        let mut local_experts = vec![Vec::new(); world];
        let mut tokens_per_expert = vec![0; config.num_experts];
        for (token, slots) in topk_idx.chunks(k).enumerate() {
            for dest in 0..world {
                let mut hit = false;
                let locals = slots.iter().map(|&e| {
                    if e >= 0 && config.rank_of_expert(e as usize) == dest {
                        hit = true;
                        config.local_expert(e as usize) as i32
                    } else {
                        -1
                    }
                });
                let locals: Vec<i32> = locals.collect();
                if hit {
                    tokens_per_rank[dest].push(token);
                    local_experts[dest].extend(locals);
                }
            }
            for &e in slots.iter().filter(|&&e| e >= 0) {
                tokens_per_expert[e as usize] += 1;
            }
        }
        Self {
            tokens_per_rank,
            local_experts,
            tokens_per_expert,
        }
    }

    pub fn send_counts(&self) -> Vec<usize> {
        self.tokens_per_rank.iter().map(Vec::len).collect()
    }
}

/// The receive side: where each received row goes in the expert-major output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertLayout {
    /// Rows per local expert, before padding.
    pub expert_counts: Vec<usize>,
    /// Start of each local expert's padded group; the last entry is the padded total.
    pub expert_offsets: Vec<usize>,
    /// For each expert-major row: the received row and top-k slot it came from, or
    /// `None` for an alignment pad row.
    pub row_origin: Vec<Option<(usize, usize)>>,
    /// For each received row, its expert-major rows in ascending local-expert order.
    pub contributions: Vec<Vec<usize>>,
}

impl ExpertLayout {
    /// Builds the expert-major layout from the received rows' local expert ids
    /// (`[received, top_k]`, `-1` where a slot is not on this rank).
    pub fn new(config: &EpConfig, recv_local_experts: &[i32]) -> Self {
        let k = config.top_k;
        let local = config.experts_per_rank();
        let received = recv_local_experts.len() / k;
        let mut members: Vec<Vec<(usize, usize)>> = vec![Vec::new(); local];
        for (row, slots) in recv_local_experts.chunks(k).enumerate() {
            for (slot, &j) in slots.iter().enumerate() {
                if j >= 0 {
                    members[j as usize].push((row, slot));
                }
            }
        }
        let expert_counts: Vec<usize> = members.iter().map(Vec::len).collect();
        let mut expert_offsets = Vec::with_capacity(local + 1);
        let mut row_origin = Vec::new();
        let mut contributions = vec![Vec::new(); received];
        expert_offsets.push(0);
        for group in &members {
            for &(row, slot) in group {
                contributions[row].push(row_origin.len());
                row_origin.push(Some((row, slot)));
            }
            row_origin.resize(
                expert_offsets.last().unwrap() + config.aligned(group.len()),
                None,
            );
            expert_offsets.push(row_origin.len());
        }
        Self {
            expert_counts,
            expert_offsets,
            row_origin,
            contributions,
        }
    }

    pub fn padded_rows(&self) -> usize {
        self.row_origin.len()
    }

    /// The largest number of local experts any received row reaches.
    pub fn max_contributions(&self) -> usize {
        self.contributions.iter().map(Vec::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_layout_goes_once_per_rank_and_skips_sentinels() {
        // 2 ranks, 4 experts (2 each), top-2.
        let config = EpConfig::new(2, 4, 2, 1);
        let idx = [0, 1, 1, 3, -1, -1, 2, -1];
        let layout = SendLayout::new(&config, &idx);
        assert_eq!(layout.tokens_per_rank, vec![vec![0, 1], vec![1, 3]]);
        assert_eq!(layout.local_experts[0], vec![0, 1, 1, -1]);
        assert_eq!(layout.local_experts[1], vec![-1, 1, 0, -1]);
        assert_eq!(layout.tokens_per_expert, vec![1, 2, 1, 1]);
    }

    #[test]
    fn expert_layout_pads_each_group() {
        let config = EpConfig::new(2, 4, 2, 1).with_expert_alignment(4);
        let layout = ExpertLayout::new(&config, &[0, 1, 1, -1, -1, 1]);
        assert_eq!(layout.expert_counts, vec![1, 3]);
        assert_eq!(layout.expert_offsets, vec![0, 4, 8]);
        assert_eq!(layout.row_origin[0], Some((0, 0)));
        assert_eq!(layout.row_origin[1], None);
        assert_eq!(
            &layout.row_origin[4..7],
            &[Some((0, 1)), Some((1, 0)), Some((2, 1))]
        );
        assert_eq!(layout.contributions, vec![vec![0, 4], vec![5], vec![6]]);
    }
}
