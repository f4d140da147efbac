//! Slots: exclusive prefix sums, so every (token, rank) and every (received row,
//! local expert) gets its place in token order. No atomics: the order is fixed.
//!
//! The block scan has two forms, chosen per launch: plane (warp) operations where
//! the client has them (CUDA), and a shared-memory Hillis-Steele scan where it does
//! not (lavapipe's WGSL has no plane operations).

use cubecl::prelude::*;

/// Threads per cube of the scan kernels.
pub const SCAN_BLOCK: usize = 256;

/// Consecutive rows each unit of the column scan takes per chunk.
pub const SCAN_ITEMS: usize = 16;

/// Whether `client` runs the plane form of the block scan: it has plane
/// operations, one fixed plane size, and a cube of [`SCAN_BLOCK`] units is at most
/// a plane of planes.
pub fn plane_scan_supported<R: Runtime>(client: &ComputeClient<R>) -> bool {
    let hardware = &client.properties().hardware;
    let plane = hardware.plane_size_min as usize;
    client
        .features()
        .plane
        .contains(cubecl::features::Plane::Ops)
        && plane > 0
        && plane == hardware.plane_size_max as usize
        && SCAN_BLOCK.is_multiple_of(plane)
        && SCAN_BLOCK / plane <= plane
}

/// Inclusive prefix sum of `value` across the cube; returns (inclusive, cube total).
/// `shared` holds `block + 1` entries.
#[allow(unused_assignments)]
#[cube]
fn block_scan(
    value: u32,
    shared: &mut SharedMemory<u32>,
    #[comptime] block: usize,
    #[comptime] use_plane: bool,
) -> (u32, u32) {
    let unit = UNIT_POS as usize;
    let mut inclusive = 0u32;
    if comptime!(use_plane) {
        let plane = PLANE_DIM as usize;
        let planes = block / plane;
        let in_plane = plane_inclusive_sum(value);
        if UNIT_POS_PLANE == PLANE_DIM - 1 {
            shared[unit / plane] = in_plane;
        }
        sync_cube();
        // The first plane scans the plane totals (whole plane active: no divergence).
        if unit < plane {
            let mut total = 0u32;
            if unit < planes {
                total = shared[unit];
            }
            let before = plane_exclusive_sum(total);
            let all = plane_sum(total);
            if unit < planes {
                shared[unit] = before;
            }
            if unit == 0 {
                shared[block] = all;
            }
        }
        sync_cube();
        inclusive = in_plane + shared[unit / plane];
    } else {
        shared[unit] = value;
        sync_cube();
        let mut offset = 1usize;
        while offset < block {
            let mut add = 0u32;
            if unit >= offset {
                add = shared[unit - offset];
            }
            sync_cube();
            shared[unit] += add;
            sync_cube();
            offset *= 2;
        }
        inclusive = shared[unit];
        if unit == block - 1 {
            shared[block] = inclusive;
        }
        sync_cube();
    }
    let total = shared[block];
    sync_cube();
    (inclusive, total)
}

/// One cube per column of a `rows × cols` 0/1 matrix whose entry `(r, c)` is at
/// `r * row_stride + c * col_stride` (row-major or column-major): `slots` (same
/// layout) gets, where the flag is set, the number of set entries above it in its
/// column, else `-1`; `totals[c]` is the column's count. Each unit scans `items`
/// consecutive rows of a chunk serially (independent loads in flight), and the
/// cube scans the units' counts.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn column_scan_kernel<I: Int>(
    flags: &Array<u32>,
    slots: &mut Array<I>,
    totals: &mut Array<u32>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    #[comptime] block: usize,
    #[comptime] items: usize,
    #[comptime] use_plane: bool,
    #[define(I)] _dtype: StorageType,
) {
    let c = CUBE_POS;
    if c >= cols {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let mut shared = SharedMemory::<u32>::new(block + 1);
    let mut carry = 0u32;
    let span = block * items;
    #[allow(clippy::manual_div_ceil)] // kernel code: div_ceil does not expand in CubeCL
    let chunks = (rows + span - 1) / span;
    for chunk in 0..chunks {
        let first = chunk * span + unit * items;
        let mut count = 0u32;
        #[unroll]
        for q in 0..items {
            let r = first + q;
            if r < rows {
                count += flags[r * row_stride + c * col_stride];
            }
        }
        let (inclusive, total) = block_scan(count, &mut shared, block, use_plane);
        let mut next = carry + inclusive - count;
        #[unroll]
        for q in 0..items {
            let r = first + q;
            if r < rows {
                let at = r * row_stride + c * col_stride;
                if flags[at] == 1u32 {
                    slots[at] = I::cast_from(next);
                    next += 1u32;
                } else {
                    slots[at] = I::new(-1);
                }
            }
        }
        carry += total;
    }
    if unit == 0 {
        totals[c] = carry;
    }
}

/// One unit per (token, rank): turns per-rank slots into rows of the whole send
/// buffer, whose segments are in rank order (`counts[..W]` the segment sizes).
#[cube(launch)]
pub fn offset_slots_kernel<I: Int>(
    slots: &mut Array<I>,
    counts: &Array<u32>,
    tokens: usize,
    world: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if at >= tokens * world {
        terminate!();
    }
    let slot = slots[at];
    if slot >= I::new(0) {
        let d = at % world;
        let mut offset = 0u32;
        for before in 0..d {
            offset += counts[before];
        }
        slots[at] = slot + I::cast_from(offset);
    }
}

/// One unit per (received row, slot): the expert-major row of each slot, from the
/// local expert's padded group start (`offsets [L]`) and the row's rank within the
/// expert (`ranks [L, R]`, column-major, from the scan of the membership matrix).
#[cube(launch)]
pub fn positions_kernel<I: Int>(
    local_ids: &Array<I>,
    ranks: &Array<I>,
    offsets: &Array<u32>,
    positions: &mut Array<I>,
    rows: usize,
    top_k: usize,
    #[define(I)] _dtype: StorageType,
) {
    let at = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if at >= rows * top_k {
        terminate!();
    }
    let j = local_ids[at];
    if j >= I::new(0) {
        let i = at / top_k;
        let ju = usize::cast_from(j);
        let p = usize::cast_from(offsets[ju]) + usize::cast_from(ranks[ju * rows + i]);
        positions[at] = I::cast_from(p);
    } else {
        positions[at] = I::new(-1);
    }
}
