//! Sum: the source side of combine. Every token adds the rows each rank sent back
//! for it, in rank order, accumulated in f32.

use cubecl::prelude::*;

use crate::pack::LocalSegment;

/// One cube per token `t`: `out[t] = sum over ranks d (ascending) with
/// slots[t, d] >= 0 of back[slots[t, d]]`. The rows of rank `local.rank` are read
/// from `local` instead (the rows this rank would have sent itself, which no
/// transport copied), row `s` of `back` at `local.row_of(s)`.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn sum_kernel<F: Float, I: Int, N: Size>(
    back: &Array<Vector<F, N>>,
    slots: &Array<I>,
    local: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    tokens: usize,
    world: usize,
    row_vectors: usize,
    segment: LocalSegment,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = CUBE_POS;
    if t >= tokens {
        terminate!();
    }
    let step = CUBE_DIM as usize;
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        let mut acc = Vector::<f32, N>::new(0.0);
        for d in 0..world {
            let slot = slots[t * world + d];
            if slot >= I::new(0) {
                let row = usize::cast_from(slot);
                if d == segment.rank {
                    acc +=
                        Vector::<f32, N>::cast_from(local[segment.row_of(row) * row_vectors + v]);
                } else {
                    acc += Vector::<f32, N>::cast_from(back[row * row_vectors + v]);
                }
            }
        }
        out[t * row_vectors + v] = Vector::cast_from(acc);
        v += step;
    }
}
