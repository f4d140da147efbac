//! Gradients through dispatch and combine: finite differences, parity with a dense
//! single-device MoE computing the same function, several layers on one group,
//! sentinels, empty ranks, and replays that do not match their handle.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_ep::{DispatchLayout, EpGroup, ExpertParallelBackend};
use common::*;
use ep_core::reference::RankBatch;
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern, SplitMix64};
use ep_core::{EpConfig, EpError};
use rstest::rstest;

/// One MoE layer's inputs on every rank, and every expert's `[H, H]` matrix.
#[derive(Clone)]
struct Layer {
    batches: Vec<RankBatch>,
    experts: Vec<Vec<f32>>,
}

fn layer(
    config: &EpConfig,
    tokens: usize,
    pattern: RoutingPattern,
    sentinels: SentinelPattern,
    seed: u64,
) -> Layer {
    let batches = synthetic_batches(config, tokens, pattern, sentinels, seed);
    let mut rng = SplitMix64::new(seed ^ 0xABCD);
    let h = config.hidden_size;
    let experts = (0..config.num_experts)
        .map(|_| (0..h * h).map(|_| rng.next_f32() - 0.5).collect())
        .collect();
    Layer { batches, experts }
}

/// A fixed projection per rank, so the loss is `sum over ranks of <out, proj>`.
fn projection(tokens: usize, hidden: usize, rank: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(777 + rank as u64);
    (0..tokens * hidden).map(|_| rng.next_f32() - 0.5).collect()
}

fn tensor<B: ExpertParallelBackend>(
    values: &[f32],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    floats::<B>(values, shape, device)
}

/// Gradients of one rank: x, topk_weights (per layer), and its experts' matrices.
#[derive(Debug, Clone)]
struct RankGrads {
    loss: f32,
    x: Vec<f32>,
    weights: Vec<Vec<f32>>,
    experts: Vec<Vec<f32>>,
}

/// Expert parallel: `layers` MoE layers in sequence (x → layer 1 → layer 2 ...), each
/// with its own routing, all on one group; loss = sum over ranks of <out, proj>.
fn ep_gradients<B>(
    device: B::Device,
    config: &EpConfig,
    layers: &[Layer],
    layout: DispatchLayout,
) -> Vec<RankGrads>
where
    B: ExpertParallelBackend + AutodiffBackend,
{
    let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
    run_group::<B, _, _>(config, &device, |group: &EpGroup<B>| {
        let rank = group.rank();
        let first = &layers[0].batches[rank];
        let x = tensor::<B>(&first.x, [first.tokens, h], &device).require_grad();
        let mut weights = Vec::new();
        let mut matrices = Vec::new();
        let mut hidden = x.clone();
        for layer in layers {
            let b = &layer.batches[rank];
            let w = tensor::<B>(&b.topk_weights, [b.tokens, k], &device).require_grad();
            let idx: Tensor<B, 2, Int> = ints::<B>(&b.topk_idx, [b.tokens, k], &device);
            let mats: Vec<Tensor<B, 2>> = (0..local)
                .map(|j| {
                    tensor::<B>(&layer.experts[rank * local + j], [h, h], &device).require_grad()
                })
                .collect();
            let (y, routing) = match layout {
                DispatchLayout::ExpertMajor => {
                    let d = group.dispatch(hidden, idx, w.clone())?;
                    let offsets = d.routing.expert_offsets().to_vec();
                    (run_linear_experts(d.rows, &offsets, &mats, true), d.routing)
                }
                DispatchLayout::RankMajor => {
                    let d = group.dispatch_rank_major(hidden, idx, w.clone())?;
                    let y = rank_major_linear_experts(d.rows, d.expert_ids, d.weights, &mats);
                    (y, d.routing)
                }
            };
            hidden = group.combine(y, &routing)?;
            weights.push(w);
            matrices.extend(mats);
        }
        let proj = tensor::<B>(
            &projection(first.tokens, h, rank),
            [first.tokens, h],
            &device,
        );
        let loss = (hidden * proj).sum();
        let loss_value = host(loss.clone())[0];
        let grads = loss.backward();
        let grad_of = |t: &Tensor<B, 2>| -> Vec<f32> {
            t.grad(&grads)
                .map(|g| g.into_data().convert::<f32>().to_vec().unwrap())
                .unwrap_or_else(|| vec![0.0; t.dims().iter().product()])
        };
        Ok(RankGrads {
            loss: loss_value,
            x: grad_of(&x),
            weights: weights.iter().map(grad_of).collect(),
            experts: matrices.iter().map(grad_of).collect(),
        })
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

/// The experts of one rank on its rank-major rows: each row times, for every local
/// expert `j`, its weight for `j` (zero when no slot names `j`) times matrix `j`.
fn rank_major_linear_experts<B: ExpertParallelBackend>(
    rows: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    matrices: &[Tensor<B, 2>],
) -> Tensor<B, 2> {
    if rows.dims()[0] == 0 {
        return rows; // CubeCL refuses zero-size launches
    }
    matrices
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let chose = ids.clone().equal_elem(j as i64).float();
            let weight = (weights.clone() * chose).sum_dim(1);
            rows.clone().matmul(m.clone()) * weight
        })
        .reduce(|a, b| a + b)
        .expect("a rank holds at least one expert")
}

/// The same function on one device without expert parallelism: for every token,
/// sum over its non-sentinel slots of weight × (x @ expert matrix).
fn dense_gradients<B: ExpertParallelBackend + AutodiffBackend>(
    device: B::Device,
    config: &EpConfig,
    layers: &[Layer],
) -> Vec<RankGrads> {
    let (k, h, world) = (config.top_k, config.hidden_size, config.world_size);
    let mut xs = Vec::new();
    let mut weights: Vec<Vec<Tensor<B, 2>>> = Vec::new();
    let mut matrices = Vec::new();
    let mut losses = Tensor::<B, 1>::zeros([1], &device);
    let mut rank_losses = Vec::new();
    let matrix_tensors: Vec<Vec<Tensor<B, 2>>> = layers
        .iter()
        .map(|l| {
            l.experts
                .iter()
                .map(|m| tensor::<B>(m, [h, h], &device).require_grad())
                .collect()
        })
        .collect();
    for rank in 0..world {
        let first = &layers[0].batches[rank];
        let x = tensor::<B>(&first.x, [first.tokens, h], &device).require_grad();
        let mut hidden = x.clone();
        let mut rank_weights = Vec::new();
        for (l, layer) in layers.iter().enumerate() {
            let b = &layer.batches[rank];
            let w = tensor::<B>(&b.topk_weights, [b.tokens, k], &device).require_grad();
            let mut out = Tensor::<B, 2>::zeros([b.tokens, h], &device);
            for (e, m) in matrix_tensors[l].iter().enumerate() {
                let mask: Vec<f32> = b
                    .topk_idx
                    .iter()
                    .map(|&i| (i == e as i64) as i32 as f32)
                    .collect();
                if mask.iter().all(|&v| v == 0.0) || b.tokens == 0 {
                    continue;
                }
                let coeff = (w.clone() * tensor::<B>(&mask, [b.tokens, k], &device)).sum_dim(1);
                out = out + hidden.clone().matmul(m.clone()) * coeff;
            }
            hidden = out;
            rank_weights.push(w);
        }
        let proj = tensor::<B>(
            &projection(first.tokens, h, rank),
            [first.tokens, h],
            &device,
        );
        let loss = (hidden * proj).sum();
        rank_losses.push(host(loss.clone())[0]);
        losses = losses + loss;
        xs.push(x);
        weights.push(rank_weights);
    }
    let grads = losses.backward();
    let grad_of = |t: &Tensor<B, 2>| -> Vec<f32> {
        t.grad(&grads)
            .map(|g| g.into_data().convert::<f32>().to_vec().unwrap())
            .unwrap_or_else(|| vec![0.0; t.dims().iter().product()])
    };
    let local = config.experts_per_rank();
    for layer in &matrix_tensors {
        matrices.push(layer.iter().map(grad_of).collect::<Vec<_>>());
    }
    (0..world)
        .map(|rank| RankGrads {
            loss: rank_losses[rank],
            x: grad_of(&xs[rank]),
            weights: weights[rank].iter().map(grad_of).collect(),
            experts: matrices
                .iter()
                .flat_map(|layer| layer[rank * local..(rank + 1) * local].to_vec())
                .collect(),
        })
        .collect()
}

fn assert_grads_match(ep: &[RankGrads], dense: &[RankGrads], tolerance: f32) {
    for (rank, (e, d)) in ep.iter().zip(dense).enumerate() {
        assert_close(
            &[e.loss],
            &[d.loss],
            tolerance,
            &format!("rank {rank} loss"),
        );
        assert_close(&e.x, &d.x, tolerance, &format!("rank {rank} d/dx"));
        for (l, (ew, dw)) in e.weights.iter().zip(&d.weights).enumerate() {
            assert_close(
                ew,
                dw,
                tolerance,
                &format!("rank {rank} layer {l} d/dtopk_weights"),
            );
        }
        for (j, (em, dm)) in e.experts.iter().zip(&d.experts).enumerate() {
            assert_close(em, dm, tolerance, &format!("rank {rank} expert matrix {j}"));
        }
    }
}

type AdNdArray = Autodiff<NdArray>;
type AdCube = Autodiff<Cube>;
type AdFused = Autodiff<Fused>;

/// [`ep_gradients`] on the backend `which` names, on its default device.
fn ep_gradients_on(
    which: Which,
    config: &EpConfig,
    layers: &[Layer],
    layout: DispatchLayout,
) -> Vec<RankGrads> {
    match which {
        Which::NdArray => ep_gradients::<AdNdArray>(Default::default(), config, layers, layout),
        Which::Cube => ep_gradients::<AdCube>(Default::default(), config, layers, layout),
        Which::Fused => ep_gradients::<AdFused>(Default::default(), config, layers, layout),
    }
}

fn parity(which: Which, layout: DispatchLayout, config: &EpConfig, layers: &[Layer]) {
    if !runs_here(which) {
        return;
    }
    match which {
        Which::NdArray => {
            let ep = ep_gradients::<AdNdArray>(Default::default(), config, layers, layout);
            let dense = dense_gradients::<AdNdArray>(Default::default(), config, layers);
            assert_grads_match(&ep, &dense, 1e-5);
        }
        Which::Cube => {
            let ep = ep_gradients::<AdCube>(Default::default(), config, layers, layout);
            let dense = dense_gradients::<AdCube>(Default::default(), config, layers);
            assert_grads_match(&ep, &dense, 1e-5);
        }
        Which::Fused => {
            let ep = ep_gradients::<AdFused>(Default::default(), config, layers, layout);
            let dense = dense_gradients::<AdFused>(Default::default(), config, layers);
            assert_grads_match(&ep, &dense, 1e-5);
        }
    }
}

#[rstest]
fn gradcheck_dense_parity(
    #[values(Which::NdArray, Which::Cube)] which: Which,
    #[values(DispatchLayout::ExpertMajor, DispatchLayout::RankMajor)] layout: DispatchLayout,
    #[values(1, 2, 4)] world: usize,
    #[values(RoutingPattern::Skewed, RoutingPattern::AllToOneRank)] pattern: RoutingPattern,
) {
    let config = EpConfig::new(world, 2 * world, 2, 6).with_expert_alignment(4);
    let layers = [layer(&config, 11, pattern, SentinelPattern::RandomTenth, 3)];
    parity(which, layout, &config, &layers);
}

#[rstest]
fn gradcheck_three_layers_share_one_group(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(DispatchLayout::ExpertMajor, DispatchLayout::RankMajor)] layout: DispatchLayout,
) {
    let config = EpConfig::new(2, 4, 2, 5).with_expert_alignment(2);
    let layers = [
        layer(
            &config,
            9,
            RoutingPattern::Uniform,
            SentinelPattern::None,
            1,
        ),
        layer(
            &config,
            9,
            RoutingPattern::Skewed,
            SentinelPattern::RandomTenth,
            2,
        ),
        layer(
            &config,
            9,
            RoutingPattern::EmptyExperts,
            SentinelPattern::WholeRows,
            3,
        ),
    ];
    parity(which, layout, &config, &layers);
}

/// Central differences of the total loss: the loss is linear in each input taken
/// alone, so a large step is exact up to rounding.
#[rstest]
fn gradcheck_finite_differences(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(DispatchLayout::ExpertMajor, DispatchLayout::RankMajor)] layout: DispatchLayout,
) {
    if !runs_here(which) {
        return;
    }
    let config = EpConfig::new(2, 4, 2, 3).with_expert_alignment(2);
    let base = layer(
        &config,
        5,
        RoutingPattern::Uniform,
        SentinelPattern::RandomTenth,
        9,
    );
    let grads = ep_gradients_on(which, &config, std::slice::from_ref(&base), layout);
    let total = |l: &Layer| -> f32 {
        let g = ep_gradients_on(which, &config, std::slice::from_ref(l), layout);
        g.iter().map(|r| r.loss).sum()
    };
    let step = 0.5f32;
    let mut rng = SplitMix64::new(4);
    for _ in 0..4 {
        let rank = rng.below(2);
        // d/dx
        let i = rng.below(base.batches[rank].x.len());
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus.batches[rank].x[i] += step;
        minus.batches[rank].x[i] -= step;
        let numeric = (total(&plus) - total(&minus)) / (2.0 * step);
        assert_close(
            &[grads[rank].x[i]],
            &[numeric],
            1e-3,
            &format!("d/dx rank {rank} [{i}]"),
        );
        // d/dtopk_weights
        let i = rng.below(base.batches[rank].topk_weights.len());
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus.batches[rank].topk_weights[i] += step;
        minus.batches[rank].topk_weights[i] -= step;
        let numeric = (total(&plus) - total(&minus)) / (2.0 * step);
        assert_close(
            &[grads[rank].weights[0][i]],
            &[numeric],
            1e-3,
            &format!("d/dw rank {rank} [{i}]"),
        );
        // d/dexpert matrix (rank's local expert j)
        let j = rng.below(config.experts_per_rank());
        let i = rng.below(9);
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus.experts[rank * 2 + j][i] += step;
        minus.experts[rank * 2 + j][i] -= step;
        let numeric = (total(&plus) - total(&minus)) / (2.0 * step);
        assert_close(
            &[grads[rank].experts[j][i]],
            &[numeric],
            1e-3,
            &format!("d/dexpert rank {rank} [{j}][{i}]"),
        );
    }
}

/// A token whose slots are all `-1` gets zero gradient, and a rank that receives
/// nothing (every token picks rank 0's experts) still completes the backward.
#[rstest]
fn gradcheck_sentinels_and_empty_ranks(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(DispatchLayout::ExpertMajor, DispatchLayout::RankMajor)] layout: DispatchLayout,
) {
    if !runs_here(which) {
        return;
    }
    let config = EpConfig::new(2, 4, 2, 4);
    let mut l = layer(
        &config,
        6,
        RoutingPattern::AllToOneRank,
        SentinelPattern::None,
        5,
    );
    for b in &mut l.batches {
        b.topk_idx[0] = -1;
        b.topk_idx[1] = -1; // token 0: only sentinels
    }
    let grads = ep_gradients_on(which, &config, std::slice::from_ref(&l), layout);
    for g in &grads {
        assert!(
            g.x[..4].iter().all(|&v| v == 0.0),
            "sentinel token's d/dx: {:?}",
            &g.x[..4]
        );
        assert!(g.weights[0][..2].iter().all(|&v| v == 0.0));
        assert!(
            g.x[4..].iter().any(|&v| v != 0.0),
            "routed tokens get gradients"
        );
    }
    // Rank 1 holds experts nobody picked: zero gradient, and it got there.
    assert!(grads[1].experts.iter().flatten().all(|&v| v == 0.0));
    parity(which, layout, &config, std::slice::from_ref(&l));
}

/// Replays that do not match their handle are errors on the autodiff backend too.
#[test]
fn gradcheck_replay_mismatch_is_an_error() {
    let config = EpConfig::new(2, 4, 2, 3);
    let l = layer(
        &config,
        5,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        6,
    );
    let device = Default::default();
    let results = run_group::<AdNdArray, _, _>(&config, &device, |group| {
        let b = &l.batches[group.rank()];
        let (x, idx, w) = inputs::<AdNdArray>(b, 2, &device);
        let d = group.dispatch(x.require_grad(), idx, w.require_grad())?;
        let fewer = tensor::<AdNdArray>(&b.x[..12], [4, 3], &device).require_grad();
        let wider = tensor::<AdNdArray>(&[0.0; 20], [5, 4], &device).require_grad();
        let rows = d.routing.padded_rows();
        let y_wrong = Tensor::<AdNdArray, 2>::from_data(
            TensorData::new(vec![0.0f32; (rows + 2) * 3], [rows + 2, 3]),
            &device,
        );
        Ok((
            group.dispatch_cached(fewer, &d.routing).err(),
            group.dispatch_cached(wider, &d.routing).err(),
            group.combine(y_wrong, &d.routing).err(),
        ))
    });
    for r in results {
        let (fewer, wider, y) = r.unwrap();
        assert!(
            matches!(fewer, Some(EpError::ReplayMismatch { what, .. }) if what == "x row count")
        );
        assert!(
            matches!(wider, Some(EpError::ReplayMismatch { what, .. }) if what == "x hidden size")
        );
        assert!(matches!(y, Some(EpError::ReplayMismatch { what, .. }) if what == "y row count"));
    }
}
