//! Host-side layout arithmetic: where each token is sent. The tensor-op fallback
//! uses it; the reference in `reference.rs` is written independently.

use crate::EpConfig;

/// The send side of one rank's dispatch: the result of the layout and slots steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendLayout {
    /// Per destination rank, the tokens sent there, ascending (a token goes once).
    pub tokens_per_rank: Vec<Vec<usize>>,
    /// How many (token, expert) pairs each global expert gets from this rank.
    pub tokens_per_expert: Vec<usize>,
}

impl SendLayout {
    /// Computes the layout from validated `[tokens, top_k]` ids.
    pub fn new(config: &EpConfig, topk_idx: &[i64]) -> Self {
        let k = config.top_k;
        let world = config.world_size;
        let mut tokens_per_rank = vec![Vec::new(); world];
        let mut tokens_per_expert = vec![0; config.num_experts];
        for (token, slots) in topk_idx.chunks(k).enumerate() {
            for (dest, sent) in tokens_per_rank.iter_mut().enumerate() {
                if slots
                    .iter()
                    .any(|&e| e >= 0 && config.rank_of_expert(e as usize) == dest)
                {
                    sent.push(token);
                }
            }
            for &e in slots.iter().filter(|&&e| e >= 0) {
                tokens_per_expert[e as usize] += 1;
            }
        }
        Self {
            tokens_per_rank,
            tokens_per_expert,
        }
    }

    /// Rows this rank sends each rank.
    pub fn send_counts(&self) -> Vec<usize> {
        self.tokens_per_rank.iter().map(Vec::len).collect()
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
        assert_eq!(layout.tokens_per_expert, vec![1, 2, 1, 1]);
    }
}
