//! The CubeCL kernels (wgpu on lavapipe in CI, CUDA with the `cuda` feature) against
//! the ep-core reference: alignments, hidden sizes that are and are not multiples of
//! the vector width, half precision, determinism, replay, and DeepSeek-V3 sizes.

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_ep::steps::EpCompute;
use burn_ep::ExpertParallelBackend;
use common::*;
use ep_core::reference::{self, RankBatch};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern, SplitMix64};
use ep_core::EpConfig;
use rstest::rstest;

#[rstest]
fn kernels_match_reference(
    #[values(1, 8, 128)] alignment: usize,
    // 64 and 12 are multiples of every vector width, 7 of none.
    #[values(7, 12, 64)] hidden: usize,
    #[values(
        RoutingPattern::Uniform,
        RoutingPattern::Skewed,
        RoutingPattern::AllToOneRank,
        RoutingPattern::EmptyExperts
    )]
    pattern: RoutingPattern,
    #[values(
        SentinelPattern::None,
        SentinelPattern::RandomTenth,
        SentinelPattern::WholeRows
    )]
    sentinels: SentinelPattern,
) {
    if !cube_available() {
        return;
    }
    let config = EpConfig::new(2, 8, 4, hidden).with_expert_alignment(alignment);
    let batches = synthetic_batches(&config, 45, pattern, sentinels, 21);
    let fresh = fresh_payload(&config, &batches, 45, pattern, sentinels);
    check_against_reference::<Cube>(Default::default(), config, batches, fresh);
}

/// The column scan in both its forms, launched directly: the plane form where the
/// client runs it (CUDA; on lavapipe that case says it is skipped) and the portable
/// shared-memory form everywhere, against prefix sums counted here. The library
/// picks the plane form wherever it runs, so this is where the portable form is
/// checked on a GPU. Columns longer than one cube's span carry counts across chunks.
#[rstest]
fn column_scan_forms_match_prefix_sums(#[values(false, true)] use_plane: bool) {
    use cubecl::prelude::*;
    use ep_kernels::slots;
    if !cube_available() {
        return;
    }
    let client = CubeRuntime::client(&Default::default());
    if use_plane && !slots::plane_scan_supported(&client) {
        skip("the plane form of the column scan: this client has no plane operations");
        return;
    }
    let (rows, cols) = (slots::SCAN_BLOCK * slots::SCAN_ITEMS * 2 + 37, 3);
    let mut rng = SplitMix64::new(7);
    // Column c is set with probability about (c + 1) / 4.
    let flags: Vec<u32> = (0..rows * cols)
        .map(|i| u32::from(rng.next_u64() % 4 <= (i % cols) as u64))
        .collect();
    let bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let flags_buf = client.create_from_slice(&bytes(&flags));
    let slots_buf = client.empty(rows * cols * 4);
    let totals_buf = client.create_from_slice(&bytes(&vec![0; cols]));
    unsafe {
        slots::column_scan_kernel::launch::<CubeRuntime>(
            &client,
            CubeCount::Static(cols as u32, 1, 1),
            CubeDim::new_1d(slots::SCAN_BLOCK as u32),
            ArrayArg::from_raw_parts(flags_buf, rows * cols),
            ArrayArg::from_raw_parts(slots_buf.clone(), rows * cols),
            ArrayArg::from_raw_parts(totals_buf.clone(), cols),
            rows,
            cols,
            cols,
            1,
            slots::SCAN_BLOCK,
            slots::SCAN_ITEMS,
            use_plane,
            DType::I32.into(),
        )
    };
    let words = |handle| -> Vec<u32> {
        let data = client.read_one(handle).unwrap();
        data.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (got_slots, got_totals) = (words(slots_buf), words(totals_buf));
    let mut counts = vec![0u32; cols];
    let mut want = vec![-1i32; rows * cols];
    for (i, &flag) in flags.iter().enumerate() {
        if flag == 1 {
            want[i] = counts[i % cols] as i32;
            counts[i % cols] += 1;
        }
    }
    let got_slots: Vec<i32> = got_slots.into_iter().map(|w| w as i32).collect();
    assert_eq!(got_slots, want, "slots (plane form: {use_plane})");
    assert_eq!(
        got_totals, counts,
        "column totals (plane form: {use_plane})"
    );
}

/// Dispatch + combine, returning each rank's rows and output as raw bits.
fn run_bits(config: &EpConfig, batches: &[RankBatch]) -> Vec<(Vec<u32>, Vec<u32>)> {
    let device = Default::default();
    run_group::<Cube, _, _>(config, &device, |group| {
        let (x, idx, w) = inputs::<Cube>(&batches[group.rank()], config.top_k, &device);
        let d = group.dispatch(x, idx, w)?;
        let out = group.combine(d.rows.clone(), &d.routing)?;
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect();
        Ok((bits(host(d.rows)), bits(host(out))))
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

#[test]
fn two_runs_are_bitwise_equal() {
    if !cube_available() {
        return;
    }
    let config = EpConfig::new(4, 16, 6, 96).with_expert_alignment(8);
    let batches = synthetic_batches(
        &config,
        300,
        RoutingPattern::Skewed,
        SentinelPattern::RandomTenth,
        5,
    );
    assert_eq!(run_bits(&config, &batches), run_bits(&config, &batches));
}

#[test]
fn replay_equals_a_fresh_dispatch_of_the_same_routing() {
    if !cube_available() {
        return;
    }
    let config = EpConfig::new(2, 8, 3, 40).with_expert_alignment(16);
    let (pattern, sentinels) = (RoutingPattern::Uniform, SentinelPattern::RandomTenth);
    let batches = synthetic_batches(&config, 70, pattern, sentinels, 8);
    let fresh = fresh_payload(&config, &batches, 70, pattern, sentinels);
    let device = Default::default();
    let results = run_group::<Cube, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let (x, idx, w) = inputs::<Cube>(&batches[rank], config.top_k, &device);
        let recorded = group.dispatch(x, idx.clone(), w.clone())?;
        let new_x = floats::<Cube>(
            &fresh[rank].x,
            [fresh[rank].tokens, config.hidden_size],
            &device,
        );
        let replayed = group.dispatch_cached(new_x.clone(), &recorded.routing)?;
        let again = group.dispatch(new_x, idx, w)?;
        Ok((host(replayed), host(again.rows), host(recorded.rows)))
    });
    for result in results {
        let (replayed, again, old) = result.unwrap();
        assert_eq!(replayed, again);
        assert_ne!(replayed, old, "replay must move the new payload");
    }
}

fn half_precision<B: ExpertParallelBackend>(dtype: DType) {
    let device: burn::tensor::Device<B> = Default::default();
    if !B::supports_dtype(&device, dtype) {
        skip(format!("{dtype:?} payloads: not supported by this adapter"));
        return;
    }
    let config = EpConfig::new(2, 8, 3, 24).with_expert_alignment(8);
    let mut batches = synthetic_batches(
        &config,
        33,
        RoutingPattern::Skewed,
        SentinelPattern::RandomTenth,
        17,
    );
    // Round the payload to the half type so the reference sees the same values.
    let round = |v: f32| match dtype {
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => half::bf16::from_f32(v).to_f32(),
    };
    for b in &mut batches {
        b.x.iter_mut().for_each(|v| *v = round(*v));
    }
    let expected = reference::dispatch(&config, &batches).unwrap();
    let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
    let outputs: Vec<Vec<f32>> = expected.iter().map(|e| e.rows.clone()).collect();
    let combined = reference::combine(&config, &batches, &routings, &outputs);
    let results = run_group::<B, _, _>(&config, &device, |group| {
        let b = &batches[group.rank()];
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(b.x.clone(), [b.tokens, 24]),
            (&device, dtype),
        );
        let (_, idx, w) = inputs::<B>(b, 3, &device);
        let d = group.dispatch(x, idx, w)?;
        assert_eq!(d.rows.dtype(), dtype);
        let out = group.combine(d.rows.clone(), &d.routing)?;
        Ok((host(d.rows), host(out)))
    });
    for (rank, result) in results.into_iter().enumerate() {
        let (rows, out) = result.unwrap();
        assert_eq!(
            rows, expected[rank].rows,
            "rank {rank}: half rows move exactly"
        );
        for (g, w) in out.iter().zip(&combined[rank]) {
            assert!(
                (g - w).abs() <= 2e-2 * w.abs().max(1.0),
                "rank {rank}: {g} vs {w}"
            );
        }
    }
}

#[rstest]
fn half_precision_payloads(#[values(DType::F16, DType::BF16)] dtype: DType) {
    if !cube_available() {
        return;
    }
    half_precision::<Cube>(dtype);
}

/// DeepSeek-V3 sizes: T=4096 tokens per rank, H=7168, top-8 of 256 experts, two
/// ranks sharing the device. Too big for a CPU Vulkan driver: run on a GPU host with
/// `--ignored`.
#[test]
#[ignore]
fn deepseek_sizes() {
    if !cube_available() {
        return;
    }
    let config = EpConfig::new(2, 256, 8, 7168).with_expert_alignment(128);
    let (pattern, sentinels) = (RoutingPattern::Uniform, SentinelPattern::RandomTenth);
    let batches = synthetic_batches(&config, 4096, pattern, sentinels, 99);
    let fresh = fresh_payload(&config, &batches, 4096, pattern, sentinels);
    check_against_reference::<Cube>(Default::default(), config, batches, fresh);
}

/// Inputs of combine's backward on the expert side: `rows` received rows with
/// `top_k` slots; about a fifth of the slots are `-1`, the others name distinct
/// expert-major rows, and every third expert-major row is left as a pad.
struct CombineGradCase {
    grad: Vec<f32>,
    y: Vec<f32>,
    weights: Vec<f32>,
    positions: Vec<i64>,
    pads: Vec<u32>,
    padded_rows: usize,
}

fn combine_grad_case(rows: usize, top_k: usize, hidden: usize, seed: u64) -> CombineGradCase {
    let mut rng = SplitMix64::new(seed);
    let mut positions = vec![-1i64; rows * top_k];
    let mut next = 0usize;
    let mut pads = Vec::new();
    // Slots are visited in a scrambled order, so positions are not sorted by slot.
    let mut order: Vec<usize> = (0..rows * top_k).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    for s in order {
        if rng.next_f32() < 0.2 {
            continue;
        }
        if next % 3 == 2 {
            pads.push(next as u32);
            next += 1;
        }
        positions[s] = next as i64;
        next += 1;
    }
    let padded_rows = next;
    let mut values = |n: usize| (0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>();
    CombineGradCase {
        grad: values(rows * hidden),
        y: values(padded_rows * hidden),
        weights: values(rows * top_k),
        positions,
        pads,
        padded_rows,
    }
}

/// `ep_combine_grad` against plain Rust: `grad_y[p] = w · g` at every slot's
/// position (pads zero), and `grad_w = g · y[p]` per slot (zero on `-1` slots), for
/// each pair of outputs a backward pass can ask for.
fn combine_grad_matches<B: ExpertParallelBackend>(
    hidden: usize,
    with_grad_y: bool,
    with_grad_w: bool,
) {
    let device: burn::tensor::Device<B> = Default::default();
    let (rows, top_k) = (37, 5);
    let c = combine_grad_case(rows, top_k, hidden, 41 + hidden as u64);
    let p = c.padded_rows;
    let (grad_y, grad_w) = B::ep_combine_grad(
        floats::<B>(&c.grad, [rows, hidden], &device)
            .into_primitive()
            .tensor(),
        with_grad_w.then(|| {
            floats::<B>(&c.y, [p, hidden], &device)
                .into_primitive()
                .tensor()
        }),
        floats::<B>(&c.weights, [rows, top_k], &device)
            .into_primitive()
            .tensor(),
        ints::<B>(&c.positions, [rows, top_k], &device).into_primitive(),
        p,
        &c.pads,
        with_grad_y,
    );
    let mut want_y = vec![0.0f32; p * hidden];
    let mut want_w = vec![0.0f32; rows * top_k];
    for (s, &pos) in c.positions.iter().enumerate() {
        if pos < 0 {
            continue;
        }
        let (i, pos) = (s / top_k, pos as usize);
        for h in 0..hidden {
            let g = c.grad[i * hidden + h];
            want_y[pos * hidden + h] = c.weights[s] * g;
            want_w[s] += g * c.y[pos * hidden + h];
        }
    }
    assert_eq!(grad_y.is_some(), with_grad_y);
    assert_eq!(grad_w.is_some(), with_grad_w);
    if let Some(got) = grad_y {
        let got = host(Tensor::<B, 2>::from_primitive(
            burn::tensor::TensorPrimitive::Float(got),
        ));
        assert_close(&got, &want_y, 1e-6, "grad_y");
    }
    if let Some(got) = grad_w {
        let got = host(Tensor::<B, 2>::from_primitive(
            burn::tensor::TensorPrimitive::Float(got),
        ));
        assert_close(&got, &want_w, 1e-5, "grad_w");
    }
}

#[rstest]
fn combine_grad_matches_plain_rust(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    // 7 is a multiple of no vector width; 1200 spans more than one pass of the cube.
    #[values(7, 64, 1200)] hidden: usize,
    #[values((true, true), (true, false), (false, true))] wanted: (bool, bool),
) {
    if !runs_here(which) {
        return;
    }
    let (with_grad_y, with_grad_w) = wanted;
    match which {
        Which::NdArray => combine_grad_matches::<NdArray>(hidden, with_grad_y, with_grad_w),
        Which::Cube => combine_grad_matches::<Cube>(hidden, with_grad_y, with_grad_w),
        Which::Fused => combine_grad_matches::<Fused>(hidden, with_grad_y, with_grad_w),
    }
}

/// `ep_topk_indices` against a host sort: each row's `k` largest scores, largest
/// first. On the kernel (Cube) a row of equal scores also checks that of equal
/// scores the lower column comes first.
fn topk_matches<B: ExpertParallelBackend>(cols: usize, k: usize, ties: bool) {
    let device: burn::tensor::Device<B> = Default::default();
    let rows = 300;
    let mut rng = SplitMix64::new(cols as u64 * 31 + k as u64);
    let mut scores: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
    if ties {
        scores[..cols].fill(0.5);
        scores[cols..2 * cols]
            .iter_mut()
            .enumerate()
            .for_each(|(c, v)| *v = (c % 3) as f32);
    }
    let got = B::ep_topk_indices(
        floats::<B>(&scores, [rows, cols], &device)
            .into_primitive()
            .tensor(),
        k,
    );
    let got = host_ints(Tensor::<B, 2, burn::tensor::Int>::from_primitive(got));
    for t in 0..rows {
        let row = &scores[t * cols..(t + 1) * cols];
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let want: Vec<i64> = order[..k].iter().map(|&c| c as i64).collect();
        assert_eq!(&got[t * k..(t + 1) * k], &want[..], "row {t}");
    }
}

#[rstest]
fn topk_indices_match_a_host_sort(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values((7, 1), (64, 6), (256, 8), (9, 9))] shape: (usize, usize),
) {
    if !runs_here(which) {
        return;
    }
    let (cols, k) = shape;
    match which {
        Which::NdArray => topk_matches::<NdArray>(cols, k, false),
        Which::Cube => topk_matches::<Cube>(cols, k, true),
        Which::Fused => topk_matches::<Fused>(cols, k, true),
    }
}

/// How a test operand is stored: as it is, as a slice of a tensor with longer rows
/// (the row stride of Burn's padded rows), or as a transposed view.
#[derive(Debug, Clone, Copy)]
enum Storage {
    Contiguous,
    PaddedRows,
    Permuted,
}

/// A leaf tensor holding `values` (`shape`) the way `storage` says, and the view of
/// it that reads as `values`.
fn stored<B: burn::tensor::backend::AutodiffBackend>(
    values: &[f32],
    [g, r, c]: [usize; 3],
    storage: Storage,
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let leaf = |data: Vec<f32>, shape: [usize; 3]| {
        Tensor::<B, 3>::from_data(TensorData::new(data, shape), device).require_grad()
    };
    match storage {
        Storage::Contiguous => {
            let base = leaf(values.to_vec(), [g, r, c]);
            (base.clone(), base)
        }
        Storage::PaddedRows => {
            let pad = 5;
            let wide = values
                .chunks(c)
                .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, pad)))
                .collect();
            let base = leaf(wide, [g, r, c + pad]);
            (base.clone(), base.slice([0..g, 0..r, 0..c]))
        }
        Storage::Permuted => {
            let transposed = (0..g * r * c)
                .map(|i| {
                    let (x, j, l) = (i / (r * c), (i / r) % c, i % r);
                    values[x * r * c + l * c + j]
                })
                .collect();
            let base = leaf(transposed, [g, c, r]);
            (base.clone(), base.swap_dims(1, 2))
        }
    }
}

/// The gradient of the view `stored` made, from its leaf's.
fn view_gradient<B: burn::tensor::backend::Backend>(
    leaf_grad: Tensor<B, 3>,
    [g, r, c]: [usize; 3],
    storage: Storage,
) -> Tensor<B, 3> {
    match storage {
        Storage::Contiguous => leaf_grad,
        Storage::PaddedRows => leaf_grad.slice([0..g, 0..r, 0..c]),
        Storage::Permuted => leaf_grad.swap_dims(1, 2),
    }
}

/// `ep_batched_matmul` and both its gradients against plain Rust loops, for every
/// way of reading the operands (as stored or transposed) and of storing them:
/// Burn's matmul on NdArray and wgpu, cuBLAS on CUDA (which reads padded rows in
/// place and copies permuted views first). The tolerance is f32's: a TF32 product
/// would miss it.
fn batched_matmul_matches<B: ExpertParallelBackend>(
    transpose_a: bool,
    transpose_b: bool,
    storage: Storage,
) {
    use burn::backend::Autodiff;
    type Ad<B> = Autodiff<B>;
    let device: burn::tensor::Device<B> = Default::default();
    let (g, m, k, n) = (3, 5, 70, 9);
    let mut rng = SplitMix64::new(17 + transpose_a as u64 * 2 + transpose_b as u64);
    let mut values =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
    let (a, b, r) = (values(g * m * k), values(g * k * n), values(g * m * n));
    // Where element (i, l) of op(a), and (l, j) of op(b), of batch x is stored.
    let a_at = |x: usize, i: usize, l: usize| match transpose_a {
        false => x * m * k + i * k + l,
        true => x * m * k + l * m + i,
    };
    let b_at = |x: usize, l: usize, j: usize| match transpose_b {
        false => x * k * n + l * n + j,
        true => x * k * n + j * k + l,
    };
    let dot = |terms: &mut dyn Iterator<Item = (f32, f32)>| {
        terms.map(|(p, q)| f64::from(p) * f64::from(q)).sum::<f64>() as f32
    };
    let mut want = vec![0f32; g * m * n];
    let mut want_grad_a = vec![0f32; a.len()];
    let mut want_grad_b = vec![0f32; b.len()];
    for x in 0..g {
        let r_at = |i: usize, j: usize| r[x * m * n + i * n + j];
        for i in 0..m {
            for j in 0..n {
                want[x * m * n + i * n + j] =
                    dot(&mut (0..k).map(|l| (a[a_at(x, i, l)], b[b_at(x, l, j)])));
            }
            for l in 0..k {
                want_grad_a[a_at(x, i, l)] =
                    dot(&mut (0..n).map(|j| (r_at(i, j), b[b_at(x, l, j)])));
            }
        }
        for l in 0..k {
            for j in 0..n {
                want_grad_b[b_at(x, l, j)] =
                    dot(&mut (0..m).map(|i| (a[a_at(x, i, l)], r_at(i, j))));
            }
        }
    }
    let a_shape = if transpose_a { [g, k, m] } else { [g, m, k] };
    let b_shape = if transpose_b { [g, n, k] } else { [g, k, n] };
    let (a_leaf, a_view) = stored::<Ad<B>>(&a, a_shape, storage, &device);
    let (b_leaf, b_view) = stored::<Ad<B>>(&b, b_shape, storage, &device);
    let out = Tensor::<Ad<B>, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(
        Ad::<B>::ep_batched_matmul(
            a_view.into_primitive().tensor(),
            b_view.into_primitive().tensor(),
            transpose_a,
            transpose_b,
        ),
    ));
    assert_eq!(out.dims(), [g, m, n]);
    let r_t = Tensor::<Ad<B>, 3>::from_data(TensorData::new(r.clone(), [g, m, n]), &device);
    let grads = (out.clone() * r_t).sum().backward();
    let what = format!("{storage:?}, transposed ({transpose_a}, {transpose_b})");
    let grad_a = view_gradient(a_leaf.grad(&grads).unwrap(), a_shape, storage);
    let grad_b = view_gradient(b_leaf.grad(&grads).unwrap(), b_shape, storage);
    assert_close(&host(out), &want, 1e-5, &format!("{what}: product"));
    assert_close(
        &host(grad_a),
        &want_grad_a,
        1e-5,
        &format!("{what}: grad a"),
    );
    assert_close(
        &host(grad_b),
        &want_grad_b,
        1e-5,
        &format!("{what}: grad b"),
    );
}

#[rstest]
fn batched_matmul_and_its_gradients_match_plain_rust(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values((false, false), (true, false), (false, true), (true, true))] transposed: (bool, bool),
    #[values(Storage::Contiguous, Storage::PaddedRows, Storage::Permuted)] storage: Storage,
) {
    if !runs_here(which) {
        return;
    }
    let (transpose_a, transpose_b) = transposed;
    match which {
        Which::NdArray => batched_matmul_matches::<NdArray>(transpose_a, transpose_b, storage),
        Which::Cube => batched_matmul_matches::<Cube>(transpose_a, transpose_b, storage),
        Which::Fused => batched_matmul_matches::<Fused>(transpose_a, transpose_b, storage),
    }
}

/// `ep_swiglu` and its gradients against plain Rust in f64: values spread over
/// [-12, 12] (both tails of the sigmoid), in f32 and in half precision (against
/// the inputs as rounded, to the output's precision).
fn swiglu_matches<B: ExpertParallelBackend>(dtype: DType) {
    use burn::backend::Autodiff;
    type Ad<B> = Autodiff<B>;
    let device: burn::tensor::Device<B> = Default::default();
    if !B::supports_dtype(&device, dtype) {
        skip(format!("{dtype:?} payloads: not supported by this adapter"));
        return;
    }
    let shape = [3, 7, 24];
    let len = shape.iter().product::<usize>();
    let mut rng = SplitMix64::new(5);
    let mut values = |scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    };
    let (gate, up, seed) = (values(12.0), values(3.0), values(1.0));
    let leaf = |v: &[f32]| {
        Tensor::<Ad<B>, 3>::from_data(TensorData::new(v.to_vec(), shape), &device)
            .cast(dtype)
            .detach()
            .require_grad()
    };
    let (gate_t, up_t) = (leaf(&gate), leaf(&up));
    // The inputs as the kernel sees them (rounded to `dtype`).
    let (gate, up) = (host(gate_t.clone().inner()), host(up_t.clone().inner()));
    let out = Tensor::<Ad<B>, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(
        Ad::<B>::ep_swiglu(
            gate_t.clone().into_primitive().tensor(),
            up_t.clone().into_primitive().tensor(),
        ),
    ));
    let seed_t =
        Tensor::<Ad<B>, 3>::from_data(TensorData::new(seed.clone(), shape), &device).cast(dtype);
    let seed = host(seed_t.clone().inner());
    let grads = (out.clone() * seed_t).sum().backward();
    let sigmoid = |g: f64| 1.0 / (1.0 + (-g).exp());
    let mut want = Vec::new();
    let mut want_gate = Vec::new();
    let mut want_up = Vec::new();
    for i in 0..len {
        let (g, u, d) = (f64::from(gate[i]), f64::from(up[i]), f64::from(seed[i]));
        let s = sigmoid(g);
        want.push((g * s * u) as f32);
        want_up.push((d * g * s) as f32);
        want_gate.push((d * u * s * (1.0 + g * (1.0 - s))) as f32);
    }
    // f32: a few roundings; bf16: the output's own rounding (8 bits).
    let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let what = format!("{dtype:?}");
    assert_close(&host(out), &want, tolerance, &format!("{what}: swiglu"));
    let grad = |t: &Tensor<Ad<B>, 3>| host(t.grad(&grads).unwrap());
    assert_close(
        &grad(&gate_t),
        &want_gate,
        tolerance,
        &format!("{what}: grad gate"),
    );
    assert_close(
        &grad(&up_t),
        &want_up,
        tolerance,
        &format!("{what}: grad up"),
    );
}

#[rstest]
#[case::ndarray_f32(Which::NdArray, DType::F32)]
#[case::cube_f32(Which::Cube, DType::F32)]
#[case::cube_bf16(Which::Cube, DType::BF16)]
#[case::cube_f16(Which::Cube, DType::F16)]
#[case::fused_bf16(Which::Fused, DType::BF16)]
fn swiglu_and_its_gradients_match_plain_rust(#[case] which: Which, #[case] dtype: DType) {
    if !runs_here(which) {
        return;
    }
    match which {
        Which::NdArray => swiglu_matches::<NdArray>(dtype),
        Which::Cube => swiglu_matches::<Cube>(dtype),
        Which::Fused => swiglu_matches::<Fused>(dtype),
    }
}

/// `ep_router` (choice and weights) and its gradient in the logits against plain
/// Rust in f64: the choice against a sort of `score + bias` (the bias steering it
/// away from the best scores), the weights against their formula, and the
/// gradient against central differences of `<weights, seed>` with the choice held.
fn router_matches<B: ExpertParallelBackend>(scoring: burn_ep::steps::RouterScoring) {
    use burn::backend::Autodiff;
    use burn::tensor::Int;
    type Ad<B> = Autodiff<B>;
    let device: burn::tensor::Device<B> = Default::default();
    let (tokens, experts, k) = (9, 12, 3);
    let mut rng = SplitMix64::new(17);
    let mut values = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    };
    let (logits, bias, seed) = (
        values(tokens * experts, 3.0),
        values(experts, 0.2),
        values(tokens * k, 1.0),
    );
    let logits_t =
        Tensor::<Ad<B>, 2>::from_data(TensorData::new(logits.clone(), [tokens, experts]), &device)
            .require_grad();
    let bias_t = Tensor::<Ad<B>, 1>::from_data(TensorData::new(bias.clone(), [experts]), &device);
    let (idx, weights) = Ad::<B>::ep_router(
        logits_t.clone().into_primitive().tensor(),
        bias_t.into_primitive().tensor(),
        k,
        scoring,
    );
    let idx: Vec<i64> = Tensor::<Ad<B>, 2, Int>::from_primitive(idx)
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let weights = Tensor::<Ad<B>, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(weights));
    let seed_t = Tensor::<Ad<B>, 2>::from_data(TensorData::new(seed.clone(), [tokens, k]), &device);
    let grads = (weights.clone() * seed_t).sum().backward();
    let got_grad = host(logits_t.grad(&grads).unwrap());
    let got_weights = host(weights);

    // The host answer, token by token.
    let scores = |row: &[f64]| -> Vec<f64> {
        if scoring.sigmoid {
            row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect()
        } else {
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = row.iter().map(|&l| (l - max).exp()).sum();
            row.iter().map(|&l| (l - max).exp() / total).collect()
        }
    };
    let weights_of = |row: &[f64], chosen: &[usize]| -> Vec<f64> {
        let s = scores(row);
        let picked: Vec<f64> = chosen.iter().map(|&e| s[e]).collect();
        let sum: f64 = picked.iter().sum();
        let factor = if scoring.renormalize {
            scoring.scale / (sum + 1e-20)
        } else {
            scoring.scale
        };
        picked.iter().map(|&p| p * factor).collect()
    };
    let (mut want_weights, mut want_grad) = (Vec::new(), Vec::new());
    for t in 0..tokens {
        let row: Vec<f64> = logits[t * experts..(t + 1) * experts]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let s = scores(&row);
        let mut order: Vec<usize> = (0..experts).collect();
        // Largest first; of equal values the lower expert (a stable sort).
        order.sort_by(|&a, &b| {
            (s[b] + f64::from(bias[b]))
                .partial_cmp(&(s[a] + f64::from(bias[a])))
                .unwrap()
        });
        let chosen = &order[..k];
        let got: Vec<usize> = idx[t * k..(t + 1) * k]
            .iter()
            .map(|&e| e as usize)
            .collect();
        assert_eq!(got, chosen, "token {t}: the choice");
        want_weights.extend(weights_of(&row, chosen).iter().map(|&w| w as f32));
        let objective = |row: &[f64]| -> f64 {
            weights_of(row, chosen)
                .iter()
                .zip(&seed[t * k..(t + 1) * k])
                .map(|(w, &g)| w * f64::from(g))
                .sum()
        };
        for e in 0..experts {
            let h = 1e-5;
            let (mut up, mut down) = (row.clone(), row.clone());
            up[e] += h;
            down[e] -= h;
            want_grad.push(((objective(&up) - objective(&down)) / (2.0 * h)) as f32);
        }
    }
    let what = format!("{scoring:?}");
    assert_close(
        &got_weights,
        &want_weights,
        1e-5,
        &format!("{what}: weights"),
    );
    assert_close(&got_grad, &want_grad, 1e-4, &format!("{what}: d/dlogits"));
}

#[rstest]
fn router_and_its_gradient_match_plain_rust(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(false, true)] sigmoid: bool,
    #[values(false, true)] renormalize: bool,
) {
    if !runs_here(which) {
        return;
    }
    let scoring = burn_ep::steps::RouterScoring {
        sigmoid,
        renormalize,
        scale: 2.5,
    };
    match which {
        Which::NdArray => router_matches::<NdArray>(scoring),
        Which::Cube => router_matches::<Cube>(scoring),
        Which::Fused => router_matches::<Fused>(scoring),
    }
}
