//! Reduce: for every received row, the weighted sum of its local experts' outputs,
//! in ascending local-expert order, accumulated in f32. The adjoint of expand.

use cubecl::prelude::*;

/// One cube per received row `i` (`max_top_k >= top_k` sizes the per-row scratch): `out[i] = sum over slots k with positions[i, k] >= 0,
/// in ascending position (= local expert) order, of weights[i, k] * y[positions[i, k]]`.
#[cube(launch)]
pub fn reduce_kernel<F: Float, W: Float, I: Int, N: Size>(
    y: &Array<Vector<F, N>>,
    positions: &Array<I>,
    weights: &Array<W>,
    out: &mut Array<Vector<F, N>>,
    rows: usize,
    row_vectors: usize,
    top_k: usize,
    #[comptime] max_top_k: usize,
    #[define(F, W, I)] _dtypes: [StorageType; 3],
) {
    let i = CUBE_POS;
    if i >= rows {
        terminate!();
    }
    // Order the row's slots by position once (top-k is small: selection sort).
    let mut order_pos = Array::<u32>::new(max_top_k);
    let mut order_weight = Array::<f32>::new(max_top_k);
    let mut count = 0usize;
    let mut last = 0usize;
    for _ in 0..top_k {
        let mut best = 0usize;
        let mut best_k = top_k;
        for k in 0..top_k {
            let p = positions[i * top_k + k];
            if p >= I::new(0) {
                let pu = usize::cast_from(p);
                if (count == 0 || pu > last) && (best_k == top_k || pu < best) {
                    best = pu;
                    best_k = k;
                }
            }
        }
        if best_k < top_k {
            order_pos[count] = best as u32;
            order_weight[count] = f32::cast_from(weights[i * top_k + best_k]);
            count += 1;
            last = best;
        }
    }
    let step = CUBE_DIM as usize;
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        let mut acc = Vector::<f32, N>::new(0.0);
        for c in 0..count {
            let term = Vector::<f32, N>::cast_from(y[order_pos[c] as usize * row_vectors + v]);
            acc += term * Vector::new(order_weight[c]);
        }
        out[i * row_vectors + v] = Vector::cast_from(acc);
        v += step;
    }
}
