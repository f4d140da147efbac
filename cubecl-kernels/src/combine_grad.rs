//! The backward of combine on the expert side, in one pass. Each received row's
//! gradient `g` arrives once; for each of its slots (weight `w`, expert-major row
//! `p`) the kernel writes `grad_y[p] = w · g` and takes `grad_w = g · y[p]`. Done
//! with Burn ops it was an expand, two products and a row sum: about three times
//! the memory traffic, and six launches.

use cubecl::prelude::*;

/// Units per cube: a power of two, for the tree sum of the dot products.
pub const GRAD_BLOCK: usize = 128;

/// One cube of `block` units per received row `i`. For every slot `k` whose
/// position `p = positions[i, k]` is not `-1`:
/// - `with_grad_y`: `grad_y[p] = weights[i, k] · grad[i]` (in the rows' precision,
///   as the product of two tensors would be);
/// - `with_grad_w`: `grad_w[i, k] = sum over h of grad[i, h] · y[p, h]`, accumulated
///   in f32 in a fixed order; zero on `-1` slots.
///
/// A `false` flag leaves its output (and, for `grad_w`, `y`) untouched, so the
/// launcher may pass any array of the right type there.
#[cube(launch)]
pub fn combine_grad_kernel<F: Float, W: Float, I: Int, N: Size>(
    grad: &Array<Vector<F, N>>,
    y: &Array<Vector<F, N>>,
    weights: &Array<W>,
    positions: &Array<I>,
    grad_y: &mut Array<Vector<F, N>>,
    grad_w: &mut Array<W>,
    rows: usize,
    row_vectors: usize,
    #[comptime] top_k: usize,
    #[comptime] block: usize,
    #[comptime] with_grad_y: bool,
    #[comptime] with_grad_w: bool,
    #[define(F, W, I)] _dtypes: [StorageType; 3],
) {
    let i = CUBE_POS;
    if i >= rows {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let mut dots = Array::<f32>::new(top_k);
    #[unroll]
    for k in 0..top_k {
        dots[k] = 0.0;
    }
    let mut v = unit;
    while v < row_vectors {
        let g = grad[i * row_vectors + v];
        #[unroll]
        for k in 0..top_k {
            let p = positions[i * top_k + k];
            if p >= I::new(0) {
                let at = usize::cast_from(p) * row_vectors + v;
                if comptime!(with_grad_y) {
                    let w = F::cast_from(weights[i * top_k + k]);
                    grad_y[at] = g * Vector::new(w);
                }
                if comptime!(with_grad_w) {
                    let product =
                        Vector::<f32, N>::cast_from(g) * Vector::<f32, N>::cast_from(y[at]);
                    let mut lanes = 0.0f32;
                    #[unroll]
                    for l in 0..N::value() {
                        lanes += product[l];
                    }
                    dots[k] += lanes;
                }
            }
        }
        v += block;
    }
    if comptime!(with_grad_w) {
        // The cube's sum of every slot's partial dots: a tree in shared memory, the
        // same order on every run.
        let mut shared = SharedMemory::<f32>::new(top_k * block);
        #[unroll]
        for k in 0..top_k {
            shared[k * block + unit] = dots[k];
        }
        sync_cube();
        let mut half = (CUBE_DIM / 2) as usize;
        while half > 0 {
            if unit < half {
                #[unroll]
                for k in 0..top_k {
                    let other = shared[k * block + unit + half];
                    shared[k * block + unit] += other;
                }
            }
            sync_cube();
            half /= 2;
        }
        if unit < top_k {
            let p = positions[i * top_k + unit];
            if p >= I::new(0) {
                grad_w[i * top_k + unit] = W::cast_from(shared[unit * block]);
            } else {
                grad_w[i * top_k + unit] = W::new(0.0);
            }
        }
    }
}
