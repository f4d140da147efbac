//! Padding arithmetic.
//!
//! - Sequence parallelism: when the token count is not a multiple of `sp_size`, it
//!   is padded up. Pad rows carry `-1` in every top-k slot, so they move no bytes
//!   and reach no expert, and combine slices them off again.
//! - Uniform expert groups: every expert's rows padded to one count, so that the
//!   experts run as one batched product.

/// The token count after padding `tokens` up to a multiple of `sp_size`.
pub fn sp_padded_tokens(tokens: usize, sp_size: usize) -> usize {
    tokens.div_ceil(sp_size) * sp_size
}

/// How many pad rows `tokens` needs for `sp_size`.
pub fn sp_pad_rows(tokens: usize, sp_size: usize) -> usize {
    sp_padded_tokens(tokens, sp_size) - tokens
}

/// Pads a row-major `[tokens, top_k]` id array with sentinel rows.
pub fn pad_topk_idx(topk_idx: &[i64], top_k: usize, sp_size: usize) -> Vec<i64> {
    let tokens = topk_idx.len() / top_k.max(1);
    let mut out = topk_idx.to_vec();
    out.resize(sp_padded_tokens(tokens, sp_size) * top_k, -1);
    out
}

/// The one row count every group of `counts` pads to in a uniform layout: the
/// largest count rounded up to a bucket (an eighth of its next power of two, so that
/// nearby counts share a shape and a batched product is not planned anew for each)
/// and to `alignment`. `None` where there are no rows, or where that would more
/// than double the rows of groups padded to `alignment` only (routing too uneven
/// across the experts).
pub fn uniform_group_rows(counts: &[usize], alignment: usize) -> Option<usize> {
    let aligned = |c: usize| c.div_ceil(alignment) * alignment;
    let largest = counts.iter().copied().max().unwrap_or(0);
    let aligned_total: usize = counts.iter().map(|&c| aligned(c)).sum();
    let bucket = (largest.next_power_of_two() / 8).max(1);
    let rows = aligned(largest.div_ceil(bucket) * bucket);
    (largest > 0 && counts.len() * rows <= 2 * aligned_total).then_some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_groups_take_the_largest_bucketed_and_aligned() {
        // Counts 3, 4, 0: 4 each.
        assert_eq!(uniform_group_rows(&[3, 4, 0], 1), Some(4));
        // 100 and 90: bucket 128 / 8 = 16, so 112 each; aligned to 64, 128.
        assert_eq!(uniform_group_rows(&[100, 90], 1), Some(112));
        assert_eq!(uniform_group_rows(&[100, 90], 64), Some(128));
        // 384 (a power of two's multiple of its bucket 64) stays.
        assert_eq!(uniform_group_rows(&[384, 300], 1), Some(384));
    }

    #[test]
    fn uniform_groups_decline_when_they_would_double_the_rows() {
        // Four experts, one with 9 of the 10 rows: 4 x 10 slots.
        assert_eq!(uniform_group_rows(&[9, 0, 0, 1], 1), None);
        assert_eq!(uniform_group_rows(&[0, 0], 1), None);
        assert_eq!(uniform_group_rows(&[], 1), None);
        // Against the aligned rows: 4 groups of 8 pad to 32 either way.
        assert_eq!(uniform_group_rows(&[5, 0, 0, 1], 8), Some(8));
    }

    #[test]
    fn padded_counts() {
        assert_eq!(sp_padded_tokens(7, 4), 8);
        assert_eq!(sp_padded_tokens(1, 8), 8);
        assert_eq!(sp_padded_tokens(8, 4), 8);
        assert_eq!(sp_padded_tokens(0, 4), 0);
        assert_eq!(sp_pad_rows(7, 4), 1);
        assert_eq!(sp_pad_rows(16, 8), 0);
    }

    #[test]
    fn pad_rows_are_sentinels() {
        let idx = vec![0, 1, 2, 3, 4, 5];
        let padded = pad_topk_idx(&idx, 2, 4);
        assert_eq!(padded.len(), 8);
        assert_eq!(&padded[..6], &idx[..]);
        assert!(padded[6..].iter().all(|&e| e == -1));
    }
}
