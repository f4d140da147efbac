//! Checks of routing inputs, shared by every backend before any data moves.

use crate::{EpConfig, EpError, EpResult};

/// Checks a shape against the one a call needs.
pub fn check_shape(what: &str, expected: &[usize], got: &[usize]) -> EpResult<()> {
    if expected == got {
        Ok(())
    } else {
        Err(EpError::ShapeMismatch {
            what: what.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}

/// Checks the token count of one rank against the configured maximum.
pub fn check_token_count(config: &EpConfig, tokens: usize) -> EpResult<()> {
    if tokens > config.max_tokens_per_rank {
        return Err(EpError::TooManyTokens {
            rank: config.rank,
            tokens,
            max: config.max_tokens_per_rank,
        });
    }
    Ok(())
}

/// Checks a row-major `[tokens, top_k]` array of expert ids: every id is `-1` or in
/// `0..num_experts`, and no token names one expert twice.
pub fn check_topk_idx(config: &EpConfig, topk_idx: &[i64]) -> EpResult<()> {
    let k = config.top_k;
    for (token, slots) in topk_idx.chunks(k).enumerate() {
        for (slot, &id) in slots.iter().enumerate() {
            if id == -1 {
                continue;
            }
            if id < -1 || id >= config.num_experts as i64 {
                return Err(EpError::ExpertIdOutOfRange {
                    rank: config.rank,
                    token,
                    slot,
                    id,
                    num_experts: config.num_experts,
                });
            }
            if slots[..slot].contains(&id) {
                return Err(EpError::DuplicateExpert {
                    rank: config.rank,
                    token,
                    expert: id,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EpConfig {
        EpConfig::new(2, 4, 2, 8).with_max_tokens_per_rank(3)
    }

    #[test]
    fn accepts_sentinels_and_valid_ids() {
        assert_eq!(check_topk_idx(&config(), &[0, 3, -1, -1, 2, -1]), Ok(()));
    }

    #[test]
    fn rejects_out_of_range_ids() {
        let err = check_topk_idx(&config(), &[0, 1, 4, 0]).unwrap_err();
        assert_eq!(
            err,
            EpError::ExpertIdOutOfRange {
                rank: 0,
                token: 1,
                slot: 0,
                id: 4,
                num_experts: 4
            }
        );
        assert!(matches!(
            check_topk_idx(&config(), &[-2, 1]),
            Err(EpError::ExpertIdOutOfRange { id: -2, .. })
        ));
    }

    #[test]
    fn rejects_duplicates() {
        assert!(matches!(
            check_topk_idx(&config(), &[1, 1]),
            Err(EpError::DuplicateExpert { expert: 1, .. })
        ));
    }

    #[test]
    fn rejects_too_many_tokens() {
        assert_eq!(check_token_count(&config(), 3), Ok(()));
        assert!(matches!(
            check_token_count(&config(), 4),
            Err(EpError::TooManyTokens {
                tokens: 4,
                max: 3,
                ..
            })
        ));
    }
}
