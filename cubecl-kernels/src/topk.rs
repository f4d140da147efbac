//! Top-k: the indices of each row's `k` largest scores, largest first, ties to the
//! lower index. One unit per row keeps the best `k` so far in registers: the
//! router's choice without a sort (Burn 0.21 sorts on the host on CubeCL backends).

use cubecl::prelude::*;

/// One unit per row `t` of `scores [rows, cols]`: `indices[t, ..top_k]` the columns of
/// its `top_k` largest scores, in descending order of score; of equal scores the
/// lower column comes first.
#[cube(launch)]
pub fn topk_kernel<F: Float, I: Int>(
    scores: &Array<F>,
    indices: &mut Array<I>,
    rows: usize,
    cols: usize,
    #[comptime] top_k: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if t >= rows {
        terminate!();
    }
    // `at[q] == cols` marks a place not filled yet.
    let empty = u32::cast_from(cols);
    let mut best = Array::<f32>::new(top_k);
    let mut at = Array::<u32>::new(top_k);
    #[unroll]
    for q in 0..top_k {
        best[q] = 0.0;
        at[q] = empty;
    }
    for c in 0..cols {
        let v = f32::cast_from(scores[t * cols + c]);
        insert_ranked(&mut best, &mut at, v, u32::cast_from(c), empty, top_k);
    }
    #[unroll]
    for q in 0..top_k {
        indices[t * top_k + q] = I::cast_from(at[q]);
    }
}

/// Places value `v` of column `c` among the best `top_k` so far: `best` in
/// descending order, `at` their columns, `empty` in `at` marking a place not filled
/// yet. Only a strictly greater value ranks above another, so of equal values the
/// one placed first stays first.
#[cube]
pub fn insert_ranked(
    best: &mut Array<f32>,
    at: &mut Array<u32>,
    v: f32,
    c: u32,
    empty: u32,
    #[comptime] top_k: usize,
) {
    if at[top_k - 1] == empty || v > best[top_k - 1] {
        // Insertion from the bottom: shift the worse entries down by one.
        let mut placed = false;
        #[unroll]
        for r in 0..top_k - 1 {
            let q = top_k - 1 - r;
            if !placed {
                if at[q - 1] == empty || v > best[q - 1] {
                    best[q] = best[q - 1];
                    at[q] = at[q - 1];
                } else {
                    best[q] = v;
                    at[q] = c;
                    placed = true;
                }
            }
        }
        if !placed {
            best[0] = v;
            at[0] = c;
        }
    }
}
