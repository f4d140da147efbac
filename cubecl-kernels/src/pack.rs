//! Pack: token rows (and, when recording, their destination-local expert ids) into
//! the per-rank contiguous segments of the send buffer. Record and
//! replay are this one kernel: replay passes `record = 0` and reads the saved slots.
//!
//! The rows a rank sends itself can go straight to their place in its receive
//! buffer (`local_out`, `local_ids`), so no transport copies them a second time.

use cubecl::prelude::*;

/// One cube per token; its units stride over the row's vectors, four at a time:
/// each unit loads four vectors (four loads in flight), then stores them to every
/// destination the token goes to, so the row is read once however many ranks it
/// goes to. `slots [T, W]` are rows of the send buffer (or `-1`). With `record = 1`
/// the kernel also writes, per sent row, `out_local [S, K]` (the slot's expert as
/// the destination's local id, `-1` when it lives elsewhere).
///
/// The rows for rank `local_rank` (`world` when there is none) go to `local_out`
/// and `local_ids` instead, send row `s` to row `s - local_from + local_to`: the
/// send segment of that rank starts at `local_from`, its receive segment at
/// `local_to`.
#[cube(launch, launch_unchecked)]
pub fn pack_kernel<F: Float, I: Int, N: Size>(
    x: &Array<Vector<F, N>>,
    slots: &Array<I>,
    out: &mut Array<Vector<F, N>>,
    topk_idx: &Array<I>,
    out_local: &mut Array<I>,
    local_out: &mut Array<Vector<F, N>>,
    local_ids: &mut Array<I>,
    tokens: usize,
    world: usize,
    row_vectors: usize,
    top_k: usize,
    experts_per_rank: usize,
    record: u32,
    local: LocalSegment,
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
                let send_row = usize::cast_from(slot);
                if d == local.rank {
                    let dst = local.row_of(send_row) * row_vectors;
                    store_four(local_out, dst, v, step, row_vectors, a0, a1, a2, a3);
                } else {
                    let dst = send_row * row_vectors;
                    store_four(out, dst, v, step, row_vectors, a0, a1, a2, a3);
                }
            }
        }
        v += 4 * step;
    }
    if record == 1u32 {
        for d in 0..world {
            let slot = slots[t * world + d];
            if slot >= I::new(0) {
                let send_row = usize::cast_from(slot);
                let mut k = UNIT_POS as usize;
                while k < top_k {
                    let e = topk_idx[t * top_k + k];
                    let mut id = I::new(-1);
                    if e >= I::new(0) {
                        let expert = usize::cast_from(e);
                        if expert / experts_per_rank == d {
                            id = I::cast_from(expert % experts_per_rank);
                        }
                    }
                    if d == local.rank {
                        local_ids[local.row_of(send_row) * top_k + k] = id;
                    } else {
                        out_local[send_row * top_k + k] = id;
                    }
                    k += step;
                }
            }
        }
    }
}

/// Where one rank's own rows live: its send segment starts at row `from` of the
/// send buffer, its receive segment at row `to` of the receive buffer. `rank` is
/// the world size when no rank's rows are placed apart.
#[derive(CubeType, CubeLaunch, Clone)]
pub struct LocalSegment {
    pub rank: usize,
    pub from: usize,
    pub to: usize,
}

#[cube]
impl LocalSegment {
    /// The receive row of send row `send_row` of this segment.
    pub fn row_of(&self, send_row: usize) -> usize {
        send_row - self.from + self.to
    }
}

/// Stores the four vectors a unit loaded (`a0` at `v`, the others a stride of
/// `step` apart, those past the row skipped) to the row starting at `dst`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_four<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    dst: usize,
    v: usize,
    step: usize,
    row_vectors: usize,
    a0: Vector<F, N>,
    a1: Vector<F, N>,
    a2: Vector<F, N>,
    a3: Vector<F, N>,
) {
    out[dst + v] = a0;
    if v + step < row_vectors {
        out[dst + v + step] = a1;
    }
    if v + 2 * step < row_vectors {
        out[dst + v + 2 * step] = a2;
    }
    if v + 3 * step < row_vectors {
        out[dst + v + 3 * step] = a3;
    }
}
