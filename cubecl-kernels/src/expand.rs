//! Expand: received rows to expert-major rows, alignment pad rows zero. Written as a
//! scatter: one cube per received row loads the row once and stores it to every
//! expert-major row its slots name, so each received row is read once. Pad rows,
//! which no slot names, are zeroed by a launch of their own.

use cubecl::prelude::*;

/// One cube per received row `i`: stores the row at `positions[i, k]` for each slot
/// `k` that names a local expert (`-1` slots store nothing).
#[cube(launch)]
pub fn expand_kernel<F: Float, I: Int, N: Size>(
    rows: &Array<Vector<F, N>>,
    positions: &Array<I>,
    out: &mut Array<Vector<F, N>>,
    received: usize,
    row_vectors: usize,
    top_k: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let i = CUBE_POS;
    if i >= received {
        terminate!();
    }
    let step = CUBE_DIM as usize;
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        let value = rows[i * row_vectors + v];
        for k in 0..top_k {
            let p = positions[i * top_k + k];
            if p >= I::new(0) {
                out[usize::cast_from(p) * row_vectors + v] = value;
            }
        }
        v += step;
    }
}

/// One unit per (received row, slot): the slot's weight to the expert-major row it
/// names, `out_weights[positions[i, k]] = weights[i, k]`.
#[cube(launch)]
pub fn expand_weights_kernel<W: Float, I: Int>(
    weights: &Array<W>,
    positions: &Array<I>,
    out_weights: &mut Array<W>,
    slots: usize,
    #[define(W, I)] _dtypes: [StorageType; 2],
) {
    let s = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if s >= slots {
        terminate!();
    }
    let p = positions[s];
    if p >= I::new(0) {
        out_weights[usize::cast_from(p)] = weights[s];
    }
}

/// One cube per pad row: zeros row `pads[j]` of `out`.
#[cube(launch)]
pub fn zero_rows_kernel<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    pads: &Array<u32>,
    pad_rows: usize,
    row_vectors: usize,
    #[define(F)] _dtype: StorageType,
) {
    let j = CUBE_POS;
    if j >= pad_rows {
        terminate!();
    }
    let p = pads[j] as usize;
    let step = CUBE_DIM as usize;
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        out[p * row_vectors + v] = Vector::new(F::new(0.0));
        v += step;
    }
}
