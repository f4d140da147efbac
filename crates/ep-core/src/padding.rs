//! Sequence-parallel padding of the token dimension.
//!
//! When the token count is not a multiple of `sp_size`, it is padded up. Pad rows
//! carry `-1` in every top-k slot, so they move no bytes and reach no expert, and
//! combine slices them off again.

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

#[cfg(test)]
mod tests {
    use super::*;

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
