//! Expand: received rows to expert-major rows, alignment pad rows zero. Written as a
//! gather (one cube per output row, reading `origin`), so every output row is
//! written once and pads need no separate fill.

use cubecl::prelude::*;

/// One cube per expert-major row `p`: copies received row `origin[p] / K`, or zeros
/// for a pad row (`origin[p] = -1`). With `record = 1` it also writes the row's
/// top-k weight, `recv_weights[origin[p]]` (zero on pads), to `out_weights [P]`.
#[cube(launch)]
pub fn expand_kernel<F: Float, W: Float, I: Int, N: Size>(
    rows: &Array<Vector<F, N>>,
    origin: &Array<I>,
    out: &mut Array<Vector<F, N>>,
    recv_weights: &Array<W>,
    out_weights: &mut Array<W>,
    padded_rows: usize,
    row_vectors: usize,
    top_k: usize,
    record: u32,
    #[define(F, W, I)] _dtypes: [StorageType; 3],
) {
    let p = CUBE_POS;
    if p >= padded_rows {
        terminate!();
    }
    let step = CUBE_DIM as usize;
    let source = origin[p];
    let mut v = UNIT_POS as usize;
    if source >= I::new(0) {
        let i = usize::cast_from(source) / top_k;
        while v < row_vectors {
            out[p * row_vectors + v] = rows[i * row_vectors + v];
            v += step;
        }
    } else {
        while v < row_vectors {
            out[p * row_vectors + v] = Vector::new(F::new(0.0));
            v += step;
        }
    }
    if record == 1u32 && UNIT_POS == 0 {
        let mut weight = W::new(0.0);
        if source >= I::new(0) {
            weight = recv_weights[usize::cast_from(source)];
        }
        out_weights[p] = weight;
    }
}
