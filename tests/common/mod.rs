//! Shared test helpers: backends to run on, and conversions between the reference's
//! plain vectors and Burn tensors.
#![allow(dead_code)]

use std::time::Duration;

use burn::tensor::{Int, Tensor, TensorData};
use burn_ep::{run_local, EpConfig, EpGroup, EpResult, ExpertParallelBackend, LocalComm};
use ep_core::reference::RankBatch;

pub type NdArray = burn::backend::NdArray<f32>;
pub type Wgpu = burn::backend::Wgpu<f32, i32>;

/// The backends every routing test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    NdArray,
    Wgpu,
}

pub const TIMEOUT: Duration = Duration::from_secs(120);

pub fn floats<B: ExpertParallelBackend>(
    values: &[f32],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

pub fn ints<B: ExpertParallelBackend>(
    values: &[i64],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

pub fn host<B: ExpertParallelBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// The batch's inputs as tensors: `(x, topk_idx, topk_weights)`.
pub fn inputs<B: ExpertParallelBackend>(
    batch: &RankBatch,
    top_k: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>, Tensor<B, 2>) {
    let t = batch.tokens;
    (
        floats(&batch.x, [t, batch.hidden], device),
        ints(&batch.topk_idx, [t, top_k], device),
        floats(&batch.topk_weights, [t, top_k], device),
    )
}

/// Runs `work` on every rank of a local group on `device`; results in rank order.
pub fn run_group<B, R, F>(config: &EpConfig, device: &B::Device, work: F) -> Vec<EpResult<R>>
where
    B: ExpertParallelBackend,
    R: Send,
    F: Fn(&EpGroup<B>) -> EpResult<R> + Sync,
{
    run_local(config.world_size, TIMEOUT, |comm: LocalComm| {
        let group = EpGroup::<B>::new(config.clone(), comm, device.clone())?;
        work(&group)
    })
}

/// A stand-in expert: every row of global expert `e` is scaled by `1 + e / 4`
/// (exact in binary, so references compare bitwise).
pub fn expert_scale(expert: usize) -> f32 {
    1.0 + expert as f32 * 0.25
}

/// The stand-in experts applied on the host to one rank's expert-major rows.
pub fn apply_experts_host(
    rows: &[f32],
    offsets: &[usize],
    first_expert: usize,
    hidden: usize,
) -> Vec<f32> {
    let mut out = rows.to_vec();
    for (j, w) in offsets.windows(2).enumerate() {
        let s = expert_scale(first_expert + j);
        for v in &mut out[w[0] * hidden..w[1] * hidden] {
            *v *= s;
        }
    }
    out
}

/// The stand-in experts applied with tensor ops to one rank's expert-major rows.
pub fn apply_experts<B: ExpertParallelBackend>(
    rows: Tensor<B, 2>,
    offsets: &[usize],
    first_expert: usize,
) -> Tensor<B, 2> {
    if rows.dims()[0] == 0 {
        return rows; // CubeCL backends run no ops on zero-size tensors
    }
    let scale: Vec<f32> = offsets
        .windows(2)
        .enumerate()
        .flat_map(|(j, w)| std::iter::repeat_n(expert_scale(first_expert + j), w[1] - w[0]))
        .collect();
    let n = scale.len();
    let device = rows.device();
    rows * floats::<B>(&scale, [n, 1], &device)
}
