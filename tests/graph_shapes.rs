//! Gradients through the graphs users build, where ranks' backward graphs differ in
//! shape: two expert-parallel operations side by side, several micro-batches before
//! one backward, shared experts beside routed ones, ranks with no tokens, and ranks
//! that receive nothing in one of the operations. The reference is the same
//! function computed densely on one device. Also: ranks that make different calls
//! get a named error, never a wrong tensor.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use burn_ep::{EpConfig, EpError, EpGroup, ExpertParallelBackend};
use common::*;
use ep_core::synthetic::SplitMix64;
use rstest::rstest;

const H: usize = 3;
const K: usize = 2;

/// How the operations of one step are wired.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Graph {
    /// `A(x) + B(x)`: two operations on one input.
    SideBySide,
    /// `A(x_a)` and `B(x_b)`: the same experts on two micro-batches, one backward.
    MicroBatches,
    /// `x @ S + A(x)`: a shared expert beside the routed ones.
    SharedAndRouted,
    /// `A(x_a)` and `A'(x_b)`, where `A'` replays `A`'s routing handle (a cached
    /// dispatch, then a combine on the same handle).
    Replayed,
}

impl Graph {
    fn ops(self) -> usize {
        match self {
            Graph::SharedAndRouted => 1,
            _ => 2,
        }
    }

    fn inputs(self) -> usize {
        match self {
            Graph::MicroBatches | Graph::Replayed => 2,
            _ => 1,
        }
    }

    /// The operation whose routing operation `op` uses.
    fn routing_of(self, op: usize) -> usize {
        match self {
            Graph::Replayed => 0,
            _ => op,
        }
    }
}

/// The data of one case: per rank and operation, the routing; per rank and input,
/// the tokens; the experts' and the shared expert's matrices.
struct Case {
    config: EpConfig,
    graph: Graph,
    tokens: Vec<usize>,
    /// `[rank][input]` rows of `H` values.
    x: Vec<Vec<Vec<f32>>>,
    /// `[rank][op]` top-k ids, `tokens[rank] * K`.
    idx: Vec<Vec<Vec<i64>>>,
    /// `[rank][op]` top-k weights.
    weights: Vec<Vec<Vec<f32>>>,
    /// `[expert]` `H × H`.
    experts: Vec<Vec<f32>>,
    shared: Vec<f32>,
    /// `[rank][op]` the loss projection.
    proj: Vec<Vec<Vec<f32>>>,
}

/// Operation `o` routes every token to rank `o % W`'s experts only (op A to rank
/// 0, op B to rank 1), so in each operation one rank receives nothing.
fn case(graph: Graph, tokens: &[usize]) -> Case {
    let world = tokens.len();
    let config = EpConfig::new(world, 2 * world, K, H).with_expert_alignment(2);
    let mut rng = SplitMix64::new(42);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() - 0.5).collect() };
    let x = tokens
        .iter()
        .map(|&t| (0..graph.inputs()).map(|_| values(t * H)).collect())
        .collect();
    let weights = tokens
        .iter()
        .map(|&t| (0..graph.ops()).map(|_| values(t * K)).collect())
        .collect();
    let proj = tokens
        .iter()
        .map(|&t| (0..graph.ops()).map(|_| values(t * H)).collect())
        .collect();
    let experts = (0..config.num_experts).map(|_| values(H * H)).collect();
    let shared = values(H * H);
    let idx = tokens
        .iter()
        .map(|&t| {
            (0..graph.ops())
                .map(|o| {
                    let first = 2 * (o % world) as i64;
                    // Alternate the slot order; every fifth token has one sentinel.
                    (0..t)
                        .flat_map(|i| match i % 5 {
                            4 => [-1, first + 1],
                            j if j % 2 == 0 => [first, first + 1],
                            _ => [first + 1, first],
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    Case {
        config,
        graph,
        tokens: tokens.to_vec(),
        x,
        idx,
        weights,
        experts,
        shared,
        proj,
    }
}

/// One rank's gradients (and loss).
#[derive(Debug)]
struct Grads {
    loss: f32,
    x: Vec<Vec<f32>>,
    weights: Vec<Vec<f32>>,
    /// This rank's experts only.
    experts: Vec<Vec<f32>>,
    shared: Vec<f32>,
}

fn grad_of<B: AutodiffBackend>(t: &Tensor<B, 2>, grads: &B::Gradients) -> Vec<f32> {
    t.grad(grads)
        .map(host)
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| vec![0.0; t.dims().iter().product()])
}

/// `<out, proj>`; on zero rows a zero still hanging off `out` (burn-ep's sum, which
/// needs no kernel there), so this rank's backward pass reaches the group's
/// operations.
fn projected<B: ExpertParallelBackend>(out: Tensor<B, 2>, proj: &[f32]) -> Tensor<B, 1> {
    match out.dims() {
        [0, _] => burn_ep::zero_size::sum(out),
        [t, h] => {
            let proj = floats::<B>(proj, [t, h], &out.device());
            (out * proj).sum()
        }
    }
}

fn ep_gradients<B>(case: &Case, skip_empty: bool) -> Vec<Grads>
where
    B: ExpertParallelBackend + AutodiffBackend,
{
    let device = B::Device::default();
    let local = case.config.experts_per_rank();
    run_group::<B, _, _>(&case.config, &device, |group: &EpGroup<B>| {
        let rank = group.rank();
        let t = case.tokens[rank];
        let xs: Vec<Tensor<B, 2>> = case.x[rank]
            .iter()
            .map(|x| floats::<B>(x, [t, H], &device).require_grad())
            .collect();
        let mats: Vec<Tensor<B, 2>> = (0..local)
            .map(|j| floats::<B>(&case.experts[rank * local + j], [H, H], &device).require_grad())
            .collect();
        let shared = floats::<B>(&case.shared, [H, H], &device).require_grad();
        let mut weights = Vec::new();
        let mut routings: Vec<burn_ep::Routing<B>> = Vec::new();
        let mut loss = Tensor::<B, 1>::zeros([1], &device);
        for op in 0..case.graph.ops() {
            let x = xs[op % xs.len()].clone();
            let (rows, routing) = if case.graph.routing_of(op) == op {
                let w = floats::<B>(&case.weights[rank][op], [t, K], &device).require_grad();
                let idx: Tensor<B, 2, Int> = ints::<B>(&case.idx[rank][op], [t, K], &device);
                let d = group.dispatch(x, idx, w.clone())?;
                weights.push(w);
                (d.rows, d.routing)
            } else {
                let routing = routings[case.graph.routing_of(op)].clone();
                (group.dispatch_cached(x, &routing)?, routing)
            };
            let y = run_linear_experts(rows, routing.expert_offsets(), &mats, skip_empty);
            let out = group.combine(y, &routing)?;
            loss = loss + projected(out, &case.proj[rank][op]);
            routings.push(routing);
        }
        // Burn 0.21's NdArray matmul divides by zero on zero rows: this branch is
        // about Burn's op, not burn-ep's (whose calls above take the empty batch).
        if case.graph == Graph::SharedAndRouted && t > 0 {
            let proj = floats::<B>(&case.proj[rank][0], [t, H], &device);
            loss = loss + (xs[0].clone().matmul(shared.clone()) * proj).sum();
        }
        let loss_value = host(loss.clone())[0];
        let grads = loss.backward();
        Ok(Grads {
            loss: loss_value,
            x: xs.iter().map(|x| grad_of(x, &grads)).collect(),
            weights: weights.iter().map(|w| grad_of(w, &grads)).collect(),
            experts: mats.iter().map(|m| grad_of(m, &grads)).collect(),
            shared: grad_of(&shared, &grads),
        })
    })
    .into_iter()
    .enumerate()
    .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
    .collect()
}

/// The same function on one device: for every token, the sum over its slots of
/// weight × (x @ expert matrix); the shared expert's matrix taken per rank.
fn dense_gradients<B: ExpertParallelBackend + AutodiffBackend>(case: &Case) -> Vec<Grads> {
    let device = B::Device::default();
    let experts: Vec<Tensor<B, 2>> = case
        .experts
        .iter()
        .map(|m| floats::<B>(m, [H, H], &device).require_grad())
        .collect();
    let mut total = Tensor::<B, 1>::zeros([1], &device);
    let mut per_rank = Vec::new();
    for rank in 0..case.config.world_size {
        let t = case.tokens[rank];
        let xs: Vec<Tensor<B, 2>> = case.x[rank]
            .iter()
            .map(|x| floats::<B>(x, [t, H], &device).require_grad())
            .collect();
        let shared = floats::<B>(&case.shared, [H, H], &device).require_grad();
        let mut weights = Vec::new();
        let mut loss = Tensor::<B, 1>::zeros([1], &device);
        if t > 0 {
            for op in 0..case.graph.ops() {
                let x = xs[op % xs.len()].clone();
                let source = case.graph.routing_of(op);
                let w = if source == op {
                    let w = floats::<B>(&case.weights[rank][op], [t, K], &device).require_grad();
                    weights.push(w.clone());
                    w
                } else {
                    weights[source].clone()
                };
                let mut out = Tensor::<B, 2>::zeros([t, H], &device);
                for (e, m) in experts.iter().enumerate() {
                    let mask: Vec<f32> = case.idx[rank][source]
                        .iter()
                        .map(|&i| f32::from(u8::from(i == e as i64)))
                        .collect();
                    let coeff = (w.clone() * floats::<B>(&mask, [t, K], &device)).sum_dim(1);
                    out = out + x.clone().matmul(m.clone()) * coeff;
                }
                loss = loss + (out * floats::<B>(&case.proj[rank][op], [t, H], &device)).sum();
            }
            if case.graph == Graph::SharedAndRouted {
                let proj = floats::<B>(&case.proj[rank][0], [t, H], &device);
                loss = loss + (xs[0].clone().matmul(shared.clone()) * proj).sum();
            }
        } else {
            weights = (0..case.graph.ops())
                .filter(|&op| case.graph.routing_of(op) == op)
                .map(|_| Tensor::<B, 2>::empty([0, K], &device))
                .collect();
        }
        per_rank.push((host(loss.clone())[0], xs, weights, shared));
        total = total + loss;
    }
    let grads = total.backward();
    let local = case.config.experts_per_rank();
    per_rank
        .into_iter()
        .enumerate()
        .map(|(rank, (loss, xs, weights, shared))| Grads {
            loss,
            x: xs.iter().map(|x| grad_of(x, &grads)).collect(),
            weights: weights.iter().map(|w| grad_of(w, &grads)).collect(),
            experts: experts[rank * local..(rank + 1) * local]
                .iter()
                .map(|m| grad_of(m, &grads))
                .collect(),
            shared: grad_of(&shared, &grads),
        })
        .collect()
}

fn assert_matches_dense(ep: &[Grads], dense: &[Grads]) {
    for (rank, (e, d)) in ep.iter().zip(dense).enumerate() {
        assert_close(&[e.loss], &[d.loss], 1e-5, &format!("rank {rank} loss"));
        for (i, (a, b)) in e.x.iter().zip(&d.x).enumerate() {
            assert_close(a, b, 1e-5, &format!("rank {rank} d/dx (input {i})"));
        }
        for (o, (a, b)) in e.weights.iter().zip(&d.weights).enumerate() {
            assert_close(a, b, 1e-5, &format!("rank {rank} d/dtopk_weights (op {o})"));
        }
        for (j, (a, b)) in e.experts.iter().zip(&d.experts).enumerate() {
            assert_close(a, b, 1e-5, &format!("rank {rank} d/dexpert {j}"));
        }
        assert_close(
            &e.shared,
            &d.shared,
            1e-5,
            &format!("rank {rank} d/dshared"),
        );
    }
}

fn parity(which: Which, graph: Graph, tokens: &[usize], skip_empty: bool) {
    // The reference runs on the same backend, so that both sides round alike (CUDA's
    // f32 matmuls are not NdArray's).
    let case = case(graph, tokens);
    let (ep, dense) = match which {
        Which::NdArray => (
            ep_gradients::<Autodiff<NdArray>>(&case, skip_empty),
            dense_gradients::<Autodiff<NdArray>>(&case),
        ),
        Which::Cube => (
            ep_gradients::<Autodiff<Cube>>(&case, skip_empty),
            dense_gradients::<Autodiff<Cube>>(&case),
        ),
        Which::Fused => (
            ep_gradients::<Autodiff<Fused>>(&case, skip_empty),
            dense_gradients::<Autodiff<Fused>>(&case),
        ),
    };
    assert_matches_dense(&ep, &dense);
}

/// Every graph, with the expert step skipping zero rows (the rank that receives
/// nothing in an operation then has a shallower graph), on uneven token counts, on
/// four ranks, and with a rank that has no tokens at all.
#[rstest]
fn graphs_whose_depth_differs_between_ranks(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(
        Graph::SideBySide,
        Graph::MicroBatches,
        Graph::SharedAndRouted,
        Graph::Replayed
    )]
    graph: Graph,
    #[values(&[5, 4][..], &[3, 6, 1, 2][..], &[5, 0][..], &[3, 6, 0, 2][..])] tokens: &[usize],
) {
    if !runs_here(which) {
        return;
    }
    parity(which, graph, tokens, true);
}

/// The expert step need not branch on an empty batch: zero rows through the same
/// ops give the same gradients. (Burn 0.21's NdArray matmul divides by zero on
/// zero rows, so this runs on the CubeCL backend.)
#[rstest]
#[cfg_attr(
    feature = "cuda",
    ignore = "Burn 0.21's CUDA matmul launches a zero-size grid on zero rows, which the driver refuses"
)]
fn expert_code_need_not_skip_zero_rows(
    #[values(Graph::SideBySide, Graph::MicroBatches)] graph: Graph,
) {
    if !cube_available() {
        return;
    }
    parity(Which::Cube, graph, &[5, 4], false);
}

/// Ranks that make different calls: rank 0 runs two operations, rank 1 one and
/// then a barrier. Both get a named mismatch, within the timeout.
#[test]
fn ranks_making_different_calls_get_a_named_error() {
    type B = NdArray;
    let case = case(Graph::SideBySide, &[4, 4]);
    let device = Default::default();
    let results = run_group::<B, _, _>(&case.config, &device, |group: &EpGroup<B>| {
        let rank = group.rank();
        let ops = if rank == 0 { 2 } else { 1 };
        for op in 0..ops {
            let x = floats::<B>(&case.x[rank][0], [4, H], &device);
            let w = floats::<B>(&case.weights[rank][op], [4, K], &device);
            let idx = ints::<B>(&case.idx[rank][op], [4, K], &device);
            let d = group.dispatch(x, idx, w)?;
            group.combine(d.rows, &d.routing)?;
        }
        group.barrier()
    });
    assert_both_calls_named(results, ["count exchange", "barrier"]);
}

/// Each of two ranks got `ExchangeMismatch` naming its own call (`calls[rank]`) as
/// expected and its peer's as what came.
fn assert_both_calls_named(results: Vec<Result<(), EpError>>, calls: [&str; 2]) {
    for (rank, result) in results.into_iter().enumerate() {
        let (mine, theirs) = (calls[rank], calls[1 - rank]);
        match result {
            Err(EpError::ExchangeMismatch { expected, got, .. }) => {
                assert!(expected.contains(mine), "rank {rank}: {expected}");
                assert!(got.contains(theirs), "rank {rank}: {got}");
            }
            other => panic!("rank {rank}: expected a mismatch, got {other:?}"),
        }
    }
}

/// A row exchange meeting another call: rank 0 combines while rank 1 is at a
/// barrier. Both name both calls, on every backend (on CUDA with cuda-peer, the
/// check rides in the combine's landing message).
fn exchange_against_a_barrier<B: ExpertParallelBackend>(device: B::Device) {
    let case = case(Graph::SideBySide, &[4, 4]);
    let results = run_group::<B, _, _>(&case.config, &device, |group: &EpGroup<B>| {
        let rank = group.rank();
        let x = floats::<B>(&case.x[rank][0], [4, H], &device);
        let w = floats::<B>(&case.weights[rank][0], [4, K], &device);
        let idx = ints::<B>(&case.idx[rank][0], [4, K], &device);
        let d = group.dispatch(x, idx, w)?;
        if rank == 0 {
            group.combine(d.rows, &d.routing).map(|_| ())
        } else {
            group.barrier()
        }
    });
    assert_both_calls_named(results, ["combine", "barrier"]);
}

#[rstest]
fn a_row_exchange_against_a_barrier_is_named(#[values(Which::NdArray, Which::Cube)] which: Which) {
    if !runs_here(which) {
        return;
    }
    match which {
        Which::NdArray => exchange_against_a_barrier::<NdArray>(Default::default()),
        Which::Cube => exchange_against_a_barrier::<Cube>(Default::default()),
        Which::Fused => exchange_against_a_barrier::<Fused>(Default::default()),
    }
}

/// Rank 1 leaves operation B out of its loss, so its backward pass has one
/// exchange fewer: every rank's backward stops with a message naming the handle
/// and what differed, instead of pairing operation A with operation B.
#[test]
fn backward_passes_that_differ_are_named() {
    type B = Autodiff<NdArray>;
    let case = case(Graph::SideBySide, &[4, 4]);
    let device = Default::default();
    let results = run_group::<B, _, _>(&case.config, &device, |group: &EpGroup<B>| {
        let rank = group.rank();
        let x = floats::<B>(&case.x[rank][0], [4, H], &device).require_grad();
        let mut outs = Vec::new();
        for op in 0..2 {
            let w = floats::<B>(&case.weights[rank][op], [4, K], &device).require_grad();
            let idx = ints::<B>(&case.idx[rank][op], [4, K], &device);
            let d = group.dispatch(x.clone(), idx, w)?;
            let y = d.rows.clone() * 2.0;
            outs.push(group.combine(y, &d.routing)?);
        }
        let loss = match rank {
            0 => (outs[0].clone() + outs[1].clone()).sum(),
            _ => outs[0].clone().sum(),
        };
        loss.backward();
        Ok(())
    });
    for (rank, result) in results.into_iter().enumerate() {
        let message = format!("{:?}", result.expect_err("the backward passes differ"));
        assert!(
            message.contains("handle") && message.contains("rank"),
            "rank {rank}: {message}"
        );
    }
}
