//! Sum: the source side of combine. Every token adds the rows each rank sent back
//! for it, in rank order, accumulated in f32.

use cubecl::prelude::*;

/// One cube per token `t`: `out[t] = sum over ranks d (ascending) with
/// slots[t, d] >= 0 of back[slots[t, d]]`.
#[cube(launch)]
pub fn sum_kernel<F: Float, I: Int, N: Size>(
    back: &Array<Vector<F, N>>,
    slots: &Array<I>,
    out: &mut Array<Vector<F, N>>,
    tokens: usize,
    world: usize,
    row_vectors: usize,
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
                acc += Vector::<f32, N>::cast_from(back[usize::cast_from(slot) * row_vectors + v]);
            }
        }
        out[t * row_vectors + v] = Vector::cast_from(acc);
        v += step;
    }
}
