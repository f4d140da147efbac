//! The router's scores, choice and weights in one pass, and their backward in one
//! more: in Burn ops the softmax, the biased choice, the gather, the
//! renormalisation and the scale are a dozen launches each way on tensors of
//! `[tokens, experts]`. One unit per token reads its logits a few times from cache
//! and computes in f32.

use cubecl::prelude::*;

use crate::topk::insert_ranked;

/// Token `t`'s score of expert `e`: a softmax over the row (`max` and `total` its
/// maximum and sum of exponentials) or a sigmoid.
#[cube]
fn score(logit: f32, max: f32, total: f32, #[comptime] sigmoid: bool) -> f32 {
    if sigmoid {
        1.0 / (1.0 + (0.0 - logit).exp())
    } else {
        (logit - max).exp() / total
    }
}

/// The row's maximum and sum of `exp(logit - max)` (unused for sigmoid scores).
#[cube]
fn row_softmax<F: Float>(logits: &Array<F>, row: usize, experts: usize) -> (f32, f32) {
    let mut max = f32::cast_from(logits[row]);
    for e in 1..experts {
        max = f32::max(max, f32::cast_from(logits[row + e]));
    }
    let mut total = 0.0f32;
    for e in 0..experts {
        total += (f32::cast_from(logits[row + e]) - max).exp();
    }
    (max, total)
}

/// One unit per token `t` of `logits [tokens, experts]`:
/// - `indices[t, ..k]`: the `k` experts of largest `score + bias`, largest first,
///   of equal values the lower expert first (as `topk_kernel`);
/// - `weights[t, ..k]`: their scores, divided by their sum (plus 1e-20) where
///   `renormalize`, times `scale`.
#[cube(launch)]
pub fn router_kernel<F: Float, I: Int>(
    logits: &Array<F>,
    bias: &Array<F>,
    indices: &mut Array<I>,
    weights: &mut Array<F>,
    tokens: usize,
    experts: usize,
    scale: f32,
    #[comptime] top_k: usize,
    #[comptime] sigmoid: bool,
    #[comptime] renormalize: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if t >= tokens {
        terminate!();
    }
    let row = t * experts;
    let (max, total) = row_softmax::<F>(logits, row, experts);
    // `at[q] == experts` marks a place not filled yet.
    let empty = u32::cast_from(experts);
    let mut best = Array::<f32>::new(top_k);
    let mut at = Array::<u32>::new(top_k);
    #[unroll]
    for q in 0..top_k {
        best[q] = 0.0;
        at[q] = empty;
    }
    for e in 0..experts {
        let s = score(f32::cast_from(logits[row + e]), max, total, sigmoid);
        let v = s + f32::cast_from(bias[e]);
        insert_ranked(&mut best, &mut at, v, u32::cast_from(e), empty, top_k);
    }
    // The chosen experts' scores, computed again as in the choice (bit for bit the
    // same) rather than carried through the insertion, which is then top-k's own.
    let mut chosen = Array::<f32>::new(top_k);
    #[unroll]
    for q in 0..top_k {
        chosen[q] = 0.0;
        if at[q] != empty {
            let e = usize::cast_from(at[q]);
            chosen[q] = score(f32::cast_from(logits[row + e]), max, total, sigmoid);
        }
    }
    let mut factor = scale;
    if renormalize {
        let mut sum = 0.0f32;
        #[unroll]
        for q in 0..top_k {
            sum += chosen[q];
        }
        factor = scale / (sum + 1e-20);
    }
    #[unroll]
    for q in 0..top_k {
        indices[t * top_k + q] = I::cast_from(at[q]);
        weights[t * top_k + q] = F::cast_from(chosen[q] * factor);
    }
}

/// One unit per token: `grad_logits[t, ..]` from the gradient of its weights
/// `grad[t, ..k]`, for the choice `indices` that [`router_kernel`] made. The weights
/// are `w_j = scale · s_j / (Σ s + 1e-20)` (or `scale · s_j`), so
/// `ds_j = scale · (g_j − Σ_m g_m w_m / scale) / (Σ s + 1e-20)`; then the softmax's
/// `dl_e = s_e (ds_e − Σ_j s_j ds_j)` or the sigmoid's `dl_e = ds_e s_e (1 − s_e)`,
/// with `ds_e` zero for the experts not chosen.
#[cube(launch)]
pub fn router_grad_kernel<F: Float, I: Int>(
    logits: &Array<F>,
    indices: &Array<I>,
    grad: &Array<F>,
    grad_logits: &mut Array<F>,
    tokens: usize,
    experts: usize,
    scale: f32,
    #[comptime] top_k: usize,
    #[comptime] sigmoid: bool,
    #[comptime] renormalize: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if t >= tokens {
        terminate!();
    }
    let row = t * experts;
    let (max, total) = row_softmax::<F>(logits, row, experts);
    let mut at = Array::<u32>::new(top_k);
    let mut s = Array::<f32>::new(top_k);
    let mut ds = Array::<f32>::new(top_k);
    let mut sum = 0.0f32;
    #[unroll]
    for q in 0..top_k {
        let e = u32::cast_from(indices[t * top_k + q]);
        at[q] = e;
        s[q] = score(
            f32::cast_from(logits[row + usize::cast_from(e)]),
            max,
            total,
            sigmoid,
        );
        sum += s[q];
    }
    // d(loss)/d(score) of each chosen expert.
    if renormalize {
        let denominator = sum + 1e-20;
        let mut weighted = 0.0f32;
        #[unroll]
        for q in 0..top_k {
            weighted += f32::cast_from(grad[t * top_k + q]) * s[q];
        }
        #[unroll]
        for q in 0..top_k {
            let g = f32::cast_from(grad[t * top_k + q]);
            ds[q] = scale * (g - weighted / denominator) / denominator;
        }
    } else {
        #[unroll]
        for q in 0..top_k {
            ds[q] = scale * f32::cast_from(grad[t * top_k + q]);
        }
    }
    let mut dot = 0.0f32;
    #[unroll]
    for q in 0..top_k {
        dot += s[q] * ds[q];
    }
    for e in 0..experts {
        let mut d = 0.0f32;
        #[unroll]
        for q in 0..top_k {
            if at[q] == u32::cast_from(e) {
                d += ds[q];
            }
        }
        let se = score(f32::cast_from(logits[row + e]), max, total, sigmoid);
        let out = if sigmoid {
            d * se * (1.0 - se)
        } else {
            se * (d - dot)
        };
        grad_logits[row + e] = F::cast_from(out);
    }
}
