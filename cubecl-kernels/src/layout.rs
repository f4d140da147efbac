//! Layout: from `topk_idx [T, K]`, which ranks each token goes to, how many
//! (token, expert) pairs each expert gets, and how many ids are bad. Sentinels (`-1`)
//! are skipped. Integer atomic adds only (lavapipe has them), so counts are exact.

use cubecl::prelude::*;

/// Where the layout kernel puts its counts in the `stats` buffer: `[W + E + 1]`.
pub fn stats_len(world: usize, num_experts: usize) -> usize {
    world + num_experts + 1
}

/// One unit per token. `in_rank [T, W]` gets 1 where the token goes to a rank;
/// `stats[W + e]` counts expert `e`'s pairs, `stats[W + E]` the tokens holding a bad
/// id (outside `-1..E`, or an expert named twice). `stats` must start zeroed;
/// `stats[..W]` is left for the slots kernel.
#[cube(launch)]
pub fn layout_kernel<I: Int>(
    topk_idx: &Array<I>,
    in_rank: &mut Array<u32>,
    stats: &mut Array<Atomic<u32>>,
    tokens: usize,
    world: usize,
    top_k: usize,
    experts_per_rank: usize,
    num_experts: usize,
    #[define(I)] _dtype: StorageType,
) {
    let t = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if t >= tokens {
        terminate!();
    }
    for d in 0..world {
        in_rank[t * world + d] = 0u32;
    }
    let mut bad = false;
    for k in 0..top_k {
        let e = topk_idx[t * top_k + k];
        if e >= I::new(0) {
            let expert = usize::cast_from(e);
            let mut repeated = false;
            for before in 0..k {
                if topk_idx[t * top_k + before] == e {
                    repeated = true;
                }
            }
            if expert >= num_experts || repeated {
                bad = true;
            } else {
                stats[world + expert].fetch_add(1u32);
                in_rank[t * world + expert / experts_per_rank] = 1u32;
            }
        } else if e != I::new(-1) {
            bad = true;
        }
    }
    if bad {
        stats[world + num_experts].fetch_add(1u32);
    }
}

/// One unit per (local expert `j`, received row `i`): `member [L, R]` (column-major,
/// so neighbouring units write neighbouring words and the scan reads each expert's
/// column contiguously) is 1 where one of the row's slots names `j` (`local_ids
/// [R, K]`, `-1` for slots of other ranks).
#[cube(launch)]
pub fn membership_kernel<I: Int>(
    local_ids: &Array<I>,
    member: &mut Array<u32>,
    rows: usize,
    top_k: usize,
    local_experts: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if at >= rows * local_experts {
        terminate!();
    }
    let j = I::cast_from(at / rows);
    let i = at % rows;
    let mut hit = 0u32;
    for k in 0..top_k {
        if local_ids[i * top_k + k] == j {
            hit = 1u32;
        }
    }
    member[at] = hit;
}
