//! Pack: token rows (and, when recording, their destination-local expert ids) into
//! the per-rank contiguous segments of the send buffer. Record and
//! replay are this one kernel: replay passes `record = 0` and reads the saved slots.

use cubecl::prelude::*;

/// One cube per token; its units stride over the row's vectors, four at a time:
/// each unit loads four vectors (four loads in flight), then stores them to every
/// destination the token goes to, so the row is read once however many ranks it
/// goes to. `slots [T, W]` are rows of the send buffer (or `-1`). With `record = 1`
/// the kernel also writes, per sent row, `out_local [S, K]` (the slot's expert as
/// the destination's local id, `-1` when it lives elsewhere).
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
    let row = t * row_vectors;
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        let (v1, v2, v3) = (v + step, v + 2 * step, v + 3 * step);
        let a0 = x[row + v];
        let mut a1 = a0;
        let mut a2 = a0;
        let mut a3 = a0;
        if v1 < row_vectors {
            a1 = x[row + v1];
        }
        if v2 < row_vectors {
            a2 = x[row + v2];
        }
        if v3 < row_vectors {
            a3 = x[row + v3];
        }
        for d in 0..world {
            let slot = slots[t * world + d];
            if slot >= I::new(0) {
                let dst = usize::cast_from(slot) * row_vectors;
                out[dst + v] = a0;
                if v1 < row_vectors {
                    out[dst + v1] = a1;
                }
                if v2 < row_vectors {
                    out[dst + v2] = a2;
                }
                if v3 < row_vectors {
                    out[dst + v3] = a3;
                }
            }
        }
        v += 4 * step;
    }
    if record == 1u32 {
        for d in 0..world {
            let slot = slots[t * world + d];
            if slot >= I::new(0) {
                let dst = usize::cast_from(slot);
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
