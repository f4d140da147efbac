//! Shared test helpers: backends to run on, and conversions between the reference's
//! plain vectors and Burn tensors.
#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use burn::tensor::{Int, Tensor, TensorData};
use burn_ep::{
    run_ranks, EpConfig, EpGroup, EpResult, ExpertParallelBackend, RunOptions, Transport,
};
use ep_core::reference::{self, RankBatch};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

pub type NdArray = burn::backend::NdArray<f32>;
/// The CubeCL backend under test, without Burn's fusion: wgpu (lavapipe in CI), or
/// CUDA when the tests are built with the `cuda` feature (on a GPU host).
#[cfg(not(feature = "cuda"))]
pub type Cube = burn_cubecl::CubeBackend<CubeRuntime, f32, i32, u32>;
#[cfg(feature = "cuda")]
pub type Cube = burn_cubecl::CubeBackend<CubeRuntime, f32, i32, u8>;
/// The CubeCL runtime of [`Cube`], for tests that launch kernels themselves.
#[cfg(not(feature = "cuda"))]
pub type CubeRuntime = cubecl::wgpu::WgpuRuntime;
#[cfg(feature = "cuda")]
pub type CubeRuntime = cubecl::cuda::CudaRuntime;
/// The same under Burn's fusion: exactly what `burn::backend::Wgpu` (or `Cuda`) is
/// with Burn's default features, which turn fusion on.
#[cfg(not(feature = "cuda"))]
pub type Fused = burn::backend::Wgpu<f32, i32>;
#[cfg(feature = "cuda")]
pub type Fused = burn::backend::Cuda<f32, i32>;

/// The variable that turns a missing wgpu adapter into a failure (set by CI, which
/// installs lavapipe, so that CI can never pass by skipping). Read by the tests only.
pub const REQUIRE_WGPU: &str = "BURN_EP_REQUIRE_WGPU";

/// The reasons of the cases this test binary skipped, one entry per case.
static SKIPS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Skips the calling case visibly: the caller returns after this. One line says so
/// at once, and at the end of the test binary, after the harness's summary (which
/// counts the case as passed), one line per reason counts the cases it skipped.
pub fn skip(reason: impl Into<String>) {
    let reason = reason.into();
    eprintln!("skipped: {reason}");
    let mut skips = SKIPS.lock().unwrap_or_else(|e| e.into_inner());
    if skips.is_empty() {
        // The harness prints its summary, then exits the process: this runs after.
        extern "C" fn report() {
            let skips = SKIPS.lock().unwrap_or_else(|e| e.into_inner());
            let mut reasons: Vec<&String> = skips.iter().collect();
            reasons.sort();
            reasons.dedup();
            for reason in reasons {
                let cases = skips.iter().filter(|s| *s == reason).count();
                eprintln!("skipped {cases} case(s): {reason}");
            }
        }
        extern "C" {
            fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
        }
        // SAFETY: `report` is a plain function that lives as long as the process.
        unsafe { atexit(report) };
    }
    skips.push(reason);
}

/// Whether the CubeCL backend under test has a device. Without one (wgpu on a
/// machine with no Vulkan driver), the caller skips its case (see [`skip`]). With
/// `BURN_EP_REQUIRE_WGPU=1` a missing adapter fails the case instead.
pub fn cube_available() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        std::panic::catch_unwind(|| {
            let t = Tensor::<Cube, 1>::zeros([1], &Default::default());
            t.into_data();
        })
        .map_err(|payload| ep_mesh::local::panic_message(payload.as_ref()))
    });
    let Err(why) = probe else {
        return true;
    };
    if std::env::var(REQUIRE_WGPU).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_WGPU}=1 but the CubeCL backend has no device: {why}");
    }
    skip(format!(
        "no Vulkan adapter for the wgpu cases (Debian: apt-get install mesa-vulkan-drivers; \
         set {REQUIRE_WGPU}=1 to fail instead)"
    ));
    false
}

/// Whether a case on `which` can run here (see [`cube_available`]).
pub fn runs_here(which: Which) -> bool {
    match which {
        Which::NdArray => true,
        Which::Cube | Which::Fused => cube_available(),
    }
}

/// The backends every routing test runs on: the tensor-op fallback and the kernels.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    NdArray,
    Cube,
    /// `Cube` under Burn's fusion (Burn's default backends).
    Fused,
}

/// Compares a combine output with the reference: exactly, except on CUDA, whose
/// compiler may fuse the reduce's multiply and add (one rounding instead of two), so
/// the difference is bounded by the size of the terms (`magnitude`), not the sum.
pub fn assert_combine_eq(got: &[f32], want: &[f32], magnitude: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if cfg!(feature = "cuda") {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(magnitude).max(1.0),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    } else {
        assert_eq!(got, want, "{what}");
    }
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

pub fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    if t.shape().num_elements() == 0 {
        // CUDA reads a zero-size buffer as bytes whose alignment a cast refuses.
        return Vec::new();
    }
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// An int tensor's values on the host (nothing is read from a zero-size tensor).
pub fn host_ints<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D, Int>,
) -> Vec<i64> {
    if t.shape().num_elements() == 0 {
        return Vec::new();
    }
    t.into_data().convert::<i64>().to_vec().unwrap()
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

/// The transport of the suite's groups: with the `cuda` feature the cuda-peer
/// transport (rows move between device buffers, the path a CUDA user takes; on a
/// one-GPU host the ranks share the device), the local transport otherwise.
pub fn transport() -> Transport {
    if cfg!(feature = "cuda") {
        Transport::CudaPeer
    } else {
        Transport::Local
    }
}

/// Every transport this build's suite checks results on: the local one, and with
/// the `cuda` feature the cuda-peer one as well.
pub fn transports() -> Vec<Transport> {
    let mut all = vec![Transport::Local];
    if cfg!(feature = "cuda") {
        all.push(Transport::CudaPeer);
    }
    all
}

/// The options of the suite's groups: its timeout, everything else default.
pub fn options() -> RunOptions {
    RunOptions::default().with_timeout(TIMEOUT)
}

/// Runs `work` on every rank of a group whose ranks all use `device`, on the
/// suite's [`transport`]; results in rank order.
pub fn run_group<B, R, F>(config: &EpConfig, device: &B::Device, work: F) -> Vec<EpResult<R>>
where
    B: ExpertParallelBackend,
    R: Send,
    F: Fn(&EpGroup<B>) -> EpResult<R> + Sync,
{
    run_group_on(transport(), config, device, work)
}

/// [`run_group`] on a given transport.
pub fn run_group_on<B, R, F>(
    transport: Transport,
    config: &EpConfig,
    device: &B::Device,
    work: F,
) -> Vec<EpResult<R>>
where
    B: ExpertParallelBackend,
    R: Send,
    F: Fn(&EpGroup<B>) -> EpResult<R> + Sync,
{
    run_group_with(transport, &options(), config, device, work)
}

/// [`run_group`] on a given transport, with `options`.
pub fn run_group_with<B, R, F>(
    transport: Transport,
    options: &RunOptions,
    config: &EpConfig,
    device: &B::Device,
    work: F,
) -> Vec<EpResult<R>>
where
    B: ExpertParallelBackend,
    R: Send,
    F: Fn(&EpGroup<B>) -> EpResult<R> + Sync,
{
    run_ranks(
        transport,
        options,
        config,
        |_, _| device.clone(),
        |group| work(&group),
    )
    .unwrap()
}

/// The experts of one rank on its expert-major rows: group `j` times its matrix.
/// With `skip_empty`, zero rows come back as they are (the graph is then shallower
/// on a rank that received nothing); without, they go through the matmuls too.
pub fn run_linear_experts<B: ExpertParallelBackend>(
    rows: Tensor<B, 2>,
    offsets: &[usize],
    matrices: &[Tensor<B, 2>],
    skip_empty: bool,
) -> Tensor<B, 2> {
    if rows.dims()[0] == 0 {
        return match skip_empty {
            true => rows,
            false => rows.matmul(matrices[0].clone()),
        };
    }
    let parts = offsets
        .windows(2)
        .zip(matrices)
        .filter(|(o, _)| o[1] > o[0])
        .map(|(o, m)| rows.clone().narrow(0, o[0], o[1] - o[0]).matmul(m.clone()))
        .collect();
    Tensor::cat(parts, 0)
}

/// `got` equals `want` within `tolerance`, relative to `max(|want|, 1)`.
pub fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * w.abs().max(1.0),
            "{what}[{i}]: {g}, expected {w}"
        );
    }
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

/// The reference's combine of the stand-in experts' outputs on the reference's
/// dispatch `expected` of `batches`: each rank's output.
pub fn reference_combine(
    config: &EpConfig,
    batches: &[RankBatch],
    expected: &[reference::ReferenceDispatch],
) -> Vec<Vec<f32>> {
    let local = config.experts_per_rank();
    let outputs: Vec<Vec<f32>> = expected
        .iter()
        .enumerate()
        .map(|(rank, e)| {
            let offsets = config.expert_offsets(&e.routing.expert_counts);
            apply_experts_host(&e.rows, &offsets, rank * local, config.hidden_size)
        })
        .collect();
    let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
    reference::combine(config, batches, &routings, &outputs)
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

/// What one rank saw: expert-major rows, counts, weights, combine output, replay rows.
type RankOutcome = (
    Vec<f32>,
    Vec<usize>,
    Vec<usize>,
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
);

pub fn check_against_reference<B: ExpertParallelBackend>(
    device: B::Device,
    config: EpConfig,
    batches: Vec<RankBatch>,
    fresh: Vec<RankBatch>,
) {
    for transport in transports() {
        check_against_reference_on::<B>(
            transport,
            device.clone(),
            config.clone(),
            batches.clone(),
            fresh.clone(),
        )
    }
}

/// Dispatch, combine and replay on every rank against the reference, over `transport`.
pub fn check_against_reference_on<B: ExpertParallelBackend>(
    transport: Transport,
    device: B::Device,
    config: EpConfig,
    batches: Vec<RankBatch>,
    fresh: Vec<RankBatch>,
) {
    check_against_reference_with::<B>(transport, &options(), device, config, batches, fresh)
}

/// [`check_against_reference_on`] with `options`.
pub fn check_against_reference_with<B: ExpertParallelBackend>(
    transport: Transport,
    options: &RunOptions,
    device: B::Device,
    config: EpConfig,
    batches: Vec<RankBatch>,
    fresh: Vec<RankBatch>,
) {
    let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
    let expected = reference::dispatch(&config, &batches).unwrap();

    let outcomes: Vec<RankOutcome> =
        run_group_with::<B, _, _>(transport, options, &config, &device, |group| {
            let rank = group.rank();
            let (x, idx, w) = inputs::<B>(&batches[rank], k, &device);
            let d = group.dispatch(x, idx, w)?;
            let offsets = d.routing.expert_offsets().to_vec();
            let y = apply_experts(d.rows.clone(), &offsets, rank * local);
            let combined = group.combine(y, &d.routing)?;
            let new_x = floats::<B>(&fresh[rank].x, [fresh[rank].tokens, h], &device);
            let replayed = group.dispatch_cached(new_x, &d.routing)?;
            Ok((
                host(d.rows),
                d.expert_counts,
                offsets,
                host(d.routing.weights()),
                host(combined),
                host(replayed),
            ))
        })
        .into_iter()
        .map(|r| r.unwrap())
        .collect();

    let mut expert_outputs = Vec::new();
    for (rank, ((rows, counts, offsets, weights, _, _), e)) in
        outcomes.iter().zip(&expected).enumerate()
    {
        assert_eq!(
            counts, &e.routing.expert_counts,
            "rank {rank}: expert counts"
        );
        assert_eq!(rows, &e.rows, "rank {rank}: expert-major rows");
        assert_eq!(weights, &e.weights, "rank {rank}: row weights");
        expert_outputs.push(apply_experts_host(&e.rows, offsets, rank * local, h));
    }
    let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
    let combined = reference::combine(&config, &batches, &routings, &expert_outputs);
    let xs: Vec<&[f32]> = fresh.iter().map(|b| b.x.as_slice()).collect();
    let replayed = reference::dispatch_cached(&routings, &xs, h);
    for (rank, outcome) in outcomes.iter().enumerate() {
        assert_combine_eq(
            &outcome.4,
            &combined[rank],
            expert_scale(config.num_experts - 1),
            &format!("rank {rank}: combine"),
        );
        assert_eq!(
            outcome.5, replayed[rank],
            "rank {rank}: replay must move the new payload"
        );
    }
}

/// The same routing as `batches` with a new payload `x`: what a replay must move.
pub fn fresh_payload(
    config: &EpConfig,
    batches: &[RankBatch],
    tokens: usize,
    pattern: RoutingPattern,
    sentinels: SentinelPattern,
) -> Vec<RankBatch> {
    synthetic_batches(config, tokens, pattern, sentinels, 1234)
        .into_iter()
        .zip(batches)
        .map(|(f, b)| RankBatch {
            x: f.x,
            ..b.clone()
        })
        .collect()
}
