//! Inputs in any layout Burn produces: transposed views, row slices and column
//! slices, for `x`, `topk_idx`, `topk_weights` and `y`, on every backend (CUDA
//! included, when built with the `cuda` feature). Each view's pads hold values
//! that would show if read (NaN rows and columns, an expert id out of range), and
//! every output and gradient must equal the same step's on contiguous inputs.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{s, BasicOps, Int, Numeric, Tensor, TensorKind};
use burn_ep::{EpConfig, EpGroup, ExpertParallelBackend};
use common::*;
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
use rstest::rstest;

const TOKENS: usize = 5;

/// The input given as a view.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Input {
    X,
    TopkIdx,
    TopkWeights,
    Y,
}

/// How the view sits in its storage.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Contiguous,
    /// The transpose of a `[cols, rows]` tensor: unit stride down the columns.
    Transposed,
    /// Rows `2..2 + rows` of a taller tensor: an offset into the storage.
    RowSlice,
    /// Columns `1..1 + cols` of a wider tensor: a row pitch wider than the row.
    ColumnSlice,
    /// Every other row of a tensor twice as tall: a slice with a step.
    EveryOtherRow,
    /// Every other column of a tensor twice as wide: no unit stride at all.
    EveryOtherColumn,
}

/// `t` re-laid out as `layout`, through differentiable ops, with `pad` everywhere
/// around it in the storage.
fn view<B, K>(t: Tensor<B, 2, K>, layout: Layout, pad: f64) -> Tensor<B, 2, K>
where
    B: ExpertParallelBackend,
    K: TensorKind<B> + BasicOps<B> + Numeric<B>,
    K::Elem: burn::tensor::Element,
{
    let [rows, cols] = t.dims();
    let device = t.device();
    let fill = |shape: [usize; 2]| Tensor::<B, 2, K>::full(shape, pad, &device);
    match layout {
        Layout::Contiguous => t,
        Layout::Transposed => Tensor::cat(vec![t.transpose(), fill([1, rows])], 0)
            .narrow(0, 0, cols)
            .transpose(),
        Layout::RowSlice => {
            Tensor::cat(vec![fill([2, cols]), t, fill([1, cols])], 0).narrow(0, 2, rows)
        }
        Layout::ColumnSlice => {
            Tensor::cat(vec![fill([rows, 1]), t, fill([rows, 2])], 1).narrow(1, 1, cols)
        }
        Layout::EveryOtherRow => {
            let pads = fill([rows, cols]).unsqueeze_dim::<3>(1);
            Tensor::cat(vec![t.unsqueeze_dim::<3>(1), pads], 1)
                .reshape([2 * rows, cols])
                .slice(s![0..2 * rows;2, ..])
        }
        Layout::EveryOtherColumn => {
            let pads = fill([rows, cols]).unsqueeze_dim::<3>(2);
            Tensor::cat(vec![t.unsqueeze_dim::<3>(2), pads], 2)
                .reshape([rows, 2 * cols])
                .slice(s![.., 0..2 * cols;2])
        }
    }
}

/// What one rank saw.
#[derive(Debug)]
struct Outcome {
    rows: Vec<f32>,
    row_weights: Vec<f32>,
    combined: Vec<f32>,
    replayed: Vec<f32>,
    grad_x: Vec<f32>,
    grad_weights: Vec<f32>,
}

/// Dispatch, stand-in experts, combine and a replay of `x`, then one backward, with
/// `input` laid out as `layout` (the others contiguous).
fn step<B>(config: &EpConfig, input: Input, layout: Layout) -> Vec<Outcome>
where
    B: ExpertParallelBackend + AutodiffBackend,
{
    let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
    let batches = synthetic_batches(
        config,
        TOKENS,
        RoutingPattern::Uniform,
        SentinelPattern::RandomTenth,
        5,
    );
    let device = B::Device::default();
    let laid_out = |which: Input| {
        if which == input {
            layout
        } else {
            Layout::Contiguous
        }
    };
    run_group::<B, _, _>(config, &device, |group: &EpGroup<B>| {
        let rank = group.rank();
        let (x, idx, w) = inputs::<B>(&batches[rank], k, &device);
        let (x, w) = (x.require_grad(), w.require_grad());
        let x_in = view(x.clone(), laid_out(Input::X), f64::NAN);
        let idx_in: Tensor<B, 2, Int> = view(idx, laid_out(Input::TopkIdx), 99.0);
        let w_in = view(w.clone(), laid_out(Input::TopkWeights), f64::NAN);
        let d = group.dispatch(x_in.clone(), idx_in, w_in)?;
        let offsets = d.routing.expert_offsets().to_vec();
        let y = apply_experts(d.rows.clone(), &offsets, rank * local);
        let combined = group.combine(view(y, laid_out(Input::Y), f64::NAN), &d.routing)?;
        let replayed = group.dispatch_cached(x_in, &d.routing)?;
        let proj = floats::<B>(&batches[(rank + 1) % 2].x, [TOKENS, h], &device);
        let loss = (combined.clone() * proj).sum() + (replayed.clone() * 0.5).sum();
        let grads = loss.backward();
        Ok(Outcome {
            rows: host(d.rows),
            row_weights: host(d.routing.weights()),
            combined: host(combined),
            replayed: host(replayed),
            grad_x: host(x.grad(&grads).expect("x has a gradient")),
            grad_weights: host(w.grad(&grads).expect("topk_weights has a gradient")),
        })
    })
    .into_iter()
    .enumerate()
    .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
    .collect()
}

fn same_as_contiguous<B>(input: Input, layout: Layout)
where
    B: ExpertParallelBackend + AutodiffBackend,
{
    let config = EpConfig::new(2, 4, 2, 8);
    let want = step::<B>(&config, Input::X, Layout::Contiguous);
    let got = step::<B>(&config, input, layout);
    for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
        let what = |part: &str| format!("rank {rank}: {part} with {input:?} as {layout:?}");
        assert_close(&g.rows, &w.rows, 1e-6, &what("expert-major rows"));
        assert_close(&g.row_weights, &w.row_weights, 1e-6, &what("row weights"));
        assert_close(&g.combined, &w.combined, 1e-6, &what("combine"));
        assert_close(&g.replayed, &w.replayed, 1e-6, &what("replay"));
        assert_close(&g.grad_x, &w.grad_x, 1e-6, &what("d/dx"));
        assert_close(
            &g.grad_weights,
            &w.grad_weights,
            1e-6,
            &what("d/dtopk_weights"),
        );
    }
}

#[rstest]
fn views_and_slices_as_inputs(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
    #[values(Input::X, Input::TopkIdx, Input::TopkWeights, Input::Y)] input: Input,
    #[values(
        Layout::Transposed,
        Layout::RowSlice,
        Layout::ColumnSlice,
        Layout::EveryOtherRow,
        Layout::EveryOtherColumn
    )]
    layout: Layout,
) {
    if !runs_here(which) {
        return;
    }
    match which {
        Which::NdArray => same_as_contiguous::<Autodiff<NdArray>>(input, layout),
        Which::Cube => same_as_contiguous::<Autodiff<Cube>>(input, layout),
        Which::Fused => same_as_contiguous::<Autodiff<Fused>>(input, layout),
    }
}
