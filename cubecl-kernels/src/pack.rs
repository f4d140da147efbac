//! Pack: token rows (and, when recording, their destination-local expert ids) into
//! the per-rank contiguous segments of the send buffer. Record and
//! replay are this one kernel: replay passes `record = 0` and reads the saved slots.

use cubecl::prelude::*;

/// One cube per token; its units stride over the row's vectors. `slots [T, W]` are
/// rows of the send buffer (or `-1`). With `record = 1` the kernel also writes, per
/// sent row, `out_local [S, K]` (the slot's expert as the destination's local id,
/// `-1` when it lives elsewhere).
#[cube(launch)]
pub fn pack_kernel<F: Float, I: Int, N: Size>(
    x: &Array<Vector<F, N>>,
    slots: &Array<I>,
    out: &mut Array<Vector<F, N>>,
    topk_idx: &Array<I>,
    out_local: &mut Array<I>,
    tokens: usize,
    world: usize,
    row_vectors: usize,
    top_k: usize,
    experts_per_rank: usize,
    record: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = CUBE_POS;
    if t >= tokens {
        terminate!();
    }
    let step = CUBE_DIM as usize;
    for d in 0..world {
        let slot = slots[t * world + d];
        if slot >= I::new(0) {
            let dst = usize::cast_from(slot);
            let mut v = UNIT_POS as usize;
            while v < row_vectors {
                out[dst * row_vectors + v] = x[t * row_vectors + v];
                v += step;
            }
            if record == 1u32 {
                let mut k = UNIT_POS as usize;
                while k < top_k {
                    let e = topk_idx[t * top_k + k];
                    let mut local = I::new(-1);
                    if e >= I::new(0) {
                        let expert = usize::cast_from(e);
                        if expert / experts_per_rank == d {
                            local = I::cast_from(expert % experts_per_rank);
                        }
                    }
                    out_local[dst * top_k + k] = local;
                    k += step;
                }
            }
        }
    }
}
