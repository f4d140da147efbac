//! The MoE layer: a [`Router`] choosing top-k experts per token, [`GroupedExperts`]
//! (SwiGLU, each rank holding only its own experts) on the expert-major rows, and
//! [`MoeLayer`] joining them through an [`EpGroup`].
//!
//! Parameters are initialised from a seeded host stream keyed by global expert id,
//! so a model split over W ranks starts exactly as the same model on one rank.

use burn::config::Config;
use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use ep_core::padding::uniform_group_rows;
use ep_core::synthetic::SplitMix64;
use ep_core::EpResult;

use crate::steps::RouterScoring;
use crate::zero_size::zeros_after;
use crate::{EpGroup, ExpertParallelBackend};

/// The layer's shape and routing choices.
#[derive(Config, Debug)]
pub struct MoeConfig {
    /// Hidden size `H` of the tokens.
    pub hidden: usize,
    /// Inner width of every SwiGLU expert.
    pub ffn_hidden: usize,
    /// Experts `E` of the whole group.
    pub num_experts: usize,
    /// Experts each token goes to.
    pub top_k: usize,
    /// Sigmoid scores (DeepSeek-V3) instead of a softmax over the experts.
    #[config(default = false)]
    pub sigmoid_scores: bool,
    /// Rescale each token's top-k weights to sum to one.
    #[config(default = true)]
    pub renormalize: bool,
    /// Multiplies the top-k weights.
    #[config(default = 1.0)]
    pub score_scale: f64,
    /// Step of the auxiliary-loss-free balancing bias (0 turns it off).
    #[config(default = 0.001)]
    pub bias_update_rate: f64,
    /// Weight of the switch-style auxiliary load-balancing loss (0 turns it off).
    #[config(default = 0.0)]
    pub aux_loss_weight: f64,
}

/// Chooses experts: scores from a linear gate, top-k on the scores plus a
/// per-expert balancing bias (used for the choice only, as in DeepSeek-V3), weights
/// from the unbiased scores.
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// `[H, E]`
    pub gate: Param<Tensor<B, 2>>,
    /// `[E]`, not trained by gradients: moved by [`MoeLayer::update_bias`].
    pub bias: Param<Tensor<B, 1>>,
    /// Experts each token goes to.
    pub top_k: usize,
    /// Sigmoid scores instead of a softmax (see [`MoeConfig::sigmoid_scores`]).
    pub sigmoid_scores: bool,
    /// Top-k weights rescaled to sum to one.
    pub renormalize: bool,
    /// Multiplies the top-k weights.
    pub score_scale: f64,
    /// Weight of the auxiliary load-balancing loss (0: none).
    pub aux_loss_weight: f64,
}

/// What the router chose for a batch of tokens.
#[derive(Debug, Clone)]
pub struct RouterOutput<B: Backend> {
    /// `[T, K]` the chosen global expert ids.
    pub topk_idx: Tensor<B, 2, burn::tensor::Int>,
    /// `[T, K]` their weights, differentiable in the gate.
    pub topk_weights: Tensor<B, 2>,
    /// The auxiliary loss, when its weight is not zero.
    pub aux_loss: Option<Tensor<B, 1>>,
}

impl<B: ExpertParallelBackend> Router<B> {
    /// The experts and weights of every token of `x` `[T, H]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> RouterOutput<B> {
        let [tokens, _] = x.dims();
        if tokens == 0 {
            return self.no_tokens(&x.device());
        }
        let [hidden, num_experts] = self.gate.val().dims();
        let logits = batched_matmul(
            x.reshape([1, tokens, hidden]),
            self.gate.val().reshape([1, hidden, num_experts]),
        )
        .reshape([tokens, num_experts]);
        let mut routed = self.choose(logits.clone());
        if self.aux_loss_weight > 0.0 {
            routed.aux_loss = Some(self.aux_loss(logits, &routed.topk_idx));
        }
        routed
    }

    /// Switch-style: `E * sum_e (fraction of pairs routed to e) * (mean score of e)`,
    /// times the loss's weight; differentiable in the scores.
    fn aux_loss(&self, logits: Tensor<B, 2>, topk_idx: &Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [tokens, num_experts] = logits.dims();
        let scores = if self.sigmoid_scores {
            sigmoid(logits)
        } else {
            softmax(logits, 1)
        };
        let device = scores.device();
        let chosen = Tensor::<B, 2>::zeros([tokens, num_experts], &device).scatter(
            1,
            topk_idx.clone(),
            Tensor::ones([tokens, self.top_k], &device),
            burn::tensor::IndexingUpdateOp::Add,
        );
        let fraction = chosen.mean_dim(0).detach() / self.top_k as f64;
        let mean_score = scores.mean_dim(0);
        (fraction * mean_score).sum() * (num_experts as f64 * self.aux_loss_weight)
    }

    /// Scores, choice and weights from the logits in burn-ep's fused op (one kernel
    /// each way on CubeCL backends); no auxiliary loss.
    fn choose(&self, logits: Tensor<B, 2>) -> RouterOutput<B> {
        let dtype = logits.dtype();
        let bias = self.bias.val().detach();
        let bias = if bias.dtype() == dtype {
            bias
        } else {
            bias.cast(dtype)
        };
        let scoring = RouterScoring {
            sigmoid: self.sigmoid_scores,
            renormalize: self.renormalize,
            scale: self.score_scale,
        };
        let (idx, weights) = B::ep_router(
            logits.into_primitive().tensor(),
            bias.into_primitive().tensor(),
            self.top_k,
            scoring,
        );
        RouterOutput {
            topk_idx: Tensor::from_primitive(idx),
            topk_weights: Tensor::from_primitive(TensorPrimitive::Float(weights)),
            aux_loss: None,
        }
    }

    /// The choice for a rank with no tokens, made without a kernel on zero rows
    /// (NdArray's matmul divides by zero there, CUDA refuses zero-size launches).
    /// The `[0, K]` weights hang off the gate, so they are tracked exactly when the
    /// other ranks' are, and this rank joins the same exchanges forward and
    /// backward; the gate's gradient from them is zero.
    fn no_tokens(&self, device: &B::Device) -> RouterOutput<B> {
        let k = self.top_k;
        let topk_idx = Tensor::<B, 2, Int>::empty([0, k], device);
        let topk_weights = zeros_after(self.gate.val(), [0, k]);
        RouterOutput {
            topk_idx,
            topk_weights,
            aux_loss: None,
        }
    }
}

/// This rank's experts, SwiGLU: `down(silu(x @ gate) * (x @ up))`.
#[derive(Module, Debug)]
pub struct GroupedExperts<B: Backend> {
    /// `[local experts, H, F]`
    pub w_gate: Param<Tensor<B, 3>>,
    /// `[local experts, H, F]`
    pub w_up: Param<Tensor<B, 3>>,
    /// `[local experts, F, H]`
    pub w_down: Param<Tensor<B, 3>>,
}

impl<B: ExpertParallelBackend> GroupedExperts<B> {
    /// Runs each local expert on its group of the expert-major rows (`offsets` as
    /// in [`crate::Routing::expert_offsets`]); pad rows stay zero. Zero rows come
    /// back as they are, still in the autodiff graph.
    ///
    /// The experts run as three batched products, one launch per projection
    /// instead of one per expert:
    /// - on the rows as they are, where every group has one row count (a group
    ///   made with [`ep_core::EpConfig::with_uniform_expert_rows`]);
    /// - else over a capacity layout that the rows are copied into (every expert's
    ///   rows padded with zero rows to one count, see [`Capacity`]).
    ///
    /// Where that padding would more than double the rows (routing very uneven
    /// across this rank's experts), each expert runs on its own rows instead.
    pub fn forward(&self, rows: Tensor<B, 2>, offsets: &[usize]) -> Tensor<B, 2> {
        let [n, hidden] = rows.dims();
        if n == 0 {
            return rows;
        }
        if let Some(c) = uniform_groups(offsets) {
            let local = offsets.len() - 1;
            return self
                .forward_groups(rows.reshape([local, c, hidden]))
                .reshape([n, hidden]);
        }
        match Capacity::of(offsets) {
            Some(capacity) => self.forward_batched(rows, &capacity),
            None => self.forward_each(rows, offsets),
        }
    }

    /// The three products on `[local, rows, H]`, each expert on its group.
    fn forward_groups(&self, groups: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = batched_matmul(groups.clone(), self.w_gate.val());
        let up = batched_matmul(groups, self.w_up.val());
        batched_matmul(swiglu(gate, up), self.w_down.val())
    }

    /// All experts at once on `[local, capacity, H]`.
    fn forward_batched(&self, rows: Tensor<B, 2>, capacity: &Capacity) -> Tensor<B, 2> {
        let [n, hidden] = rows.dims();
        let (local, c) = (capacity.local, capacity.rows);
        let device = rows.device();
        let slots = Tensor::<B, 2, Int>::from_data(
            TensorData::new(capacity.slot_of_row.clone(), [n, 1]),
            &device,
        )
        .into_primitive();
        let unfilled = &capacity.unfilled;
        // Rows into their expert's slots; the slots no row fills stay zero.
        let placed = B::ep_place_rows(
            rows.into_primitive().tensor(),
            slots.clone(),
            local * c,
            unfilled,
        );
        let slots_in = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(placed))
            .reshape([local, c, hidden]);
        let out = self.forward_groups(slots_in);
        let out = out.reshape([local * c, hidden]).into_primitive().tensor();
        Tensor::from_primitive(TensorPrimitive::Float(B::ep_take_rows(
            out, slots, unfilled,
        )))
    }

    /// One chain of products per expert, on its own rows.
    fn forward_each(&self, rows: Tensor<B, 2>, offsets: &[usize]) -> Tensor<B, 2> {
        let [local, hidden, _] = self.w_gate.val().dims();
        let matrix = |w: &Param<Tensor<B, 3>>, j: usize| w.val().narrow(0, j, 1);
        let parts = (0..local)
            .filter(|&j| offsets[j + 1] > offsets[j])
            .map(|j| {
                let count = offsets[j + 1] - offsets[j];
                let r = rows
                    .clone()
                    .narrow(0, offsets[j], count)
                    .reshape([1, count, hidden]);
                let gate = batched_matmul(r.clone(), matrix(&self.w_gate, j));
                let up = batched_matmul(r, matrix(&self.w_up, j));
                batched_matmul(swiglu(gate, up), matrix(&self.w_down, j)).reshape([count, hidden])
            })
            .collect();
        Tensor::cat(parts, 0)
    }
}

/// `a [G, M, K] · b [G, K, N]` on burn-ep's batched product (cuBLAS on CUDA).
fn batched_matmul<B: ExpertParallelBackend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(B::ep_batched_matmul(
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
        false,
        false,
    )))
}

/// `silu(gate) · up` on burn-ep's fused op (one kernel on CubeCL backends).
fn swiglu<B: ExpertParallelBackend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(B::ep_swiglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    )))
}

/// The row count of every group starting at `offsets`, where all have one and it
/// is not zero.
fn uniform_groups(offsets: &[usize]) -> Option<usize> {
    let rows = offsets.get(1)? - offsets[0];
    (rows > 0 && offsets.windows(2).all(|w| w[1] - w[0] == rows)).then_some(rows)
}

/// The capacity layout of one rank's expert-major rows: every local expert gets
/// `rows` slots, at least its count, so that the experts run as one batched product.
#[derive(Debug, Clone, PartialEq)]
struct Capacity {
    local: usize,
    /// Slots per expert: [`ep_core::padding::uniform_group_rows`] of the counts.
    rows: usize,
    /// The slot of every expert-major row: expert `j`'s `i`-th row goes to
    /// `j * rows + i`.
    slot_of_row: Vec<i64>,
    /// The slots no row fills: each expert's after its count.
    unfilled: Vec<u32>,
}

impl Capacity {
    /// The layout for groups starting at `offsets` (`local + 1` entries), or `None`
    /// where the slots would be more than twice the rows.
    fn of(offsets: &[usize]) -> Option<Self> {
        let local = offsets.len() - 1;
        let counts: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
        let rows = uniform_group_rows(&counts, 1)?;
        let slot_of_row = counts
            .iter()
            .enumerate()
            .flat_map(|(j, &count)| (0..count).map(move |i| (j * rows + i) as i64))
            .collect();
        let unfilled = counts
            .iter()
            .enumerate()
            .flat_map(|(j, &count)| (j * rows + count..(j + 1) * rows).map(|s| s as u32))
            .collect();
        Some(Self {
            local,
            rows,
            slot_of_row,
            unfilled,
        })
    }
}

/// A Mixture-of-Experts layer over an expert-parallel group.
#[derive(Module, Debug)]
pub struct MoeLayer<B: Backend> {
    /// The whole router (every rank holds it).
    pub router: Router<B>,
    /// This rank's experts.
    pub experts: GroupedExperts<B>,
    /// Step of the balancing bias in [`MoeLayer::update_bias`].
    pub bias_update_rate: f64,
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct MoeOutput<B: Backend> {
    /// `[T, H]`
    pub out: Tensor<B, 2>,
    /// The router's auxiliary loss, when its weight is not zero.
    pub aux_loss: Option<Tensor<B, 1>>,
    /// (token, expert) pairs this rank sent to each global expert.
    pub tokens_per_expert: Vec<usize>,
}

/// Host values uniform in `[-scale, scale)` from a stream keyed by `key`.
fn init_values(seed: u64, key: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect()
}

impl MoeConfig {
    /// The layer as rank `rank` of `world` holds it: the whole router, and experts
    /// `rank * E/W .. (rank + 1) * E/W`. `seed` fixes every value.
    pub fn init<B: Backend>(
        &self,
        rank: usize,
        world: usize,
        seed: u64,
        device: &B::Device,
    ) -> MoeLayer<B> {
        let (h, f, e) = (self.hidden, self.ffn_hidden, self.num_experts);
        let local = e / world;
        let param2 = |v: Vec<f32>, shape: [usize; 2]| {
            Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), device))
        };
        let experts: Vec<usize> = (rank * local..(rank + 1) * local).collect();
        let stacked = |which: u64, rows: usize, cols: usize| {
            let values: Vec<f32> = experts
                .iter()
                .flat_map(|&g| {
                    init_values(
                        seed,
                        1000 * g as u64 + which,
                        rows * cols,
                        1.0 / (rows as f32).sqrt(),
                    )
                })
                .collect();
            Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [local, rows, cols]),
                device,
            ))
        };
        MoeLayer {
            router: Router {
                gate: param2(
                    init_values(seed, u64::MAX, h * e, 1.0 / (h as f32).sqrt()),
                    [h, e],
                ),
                bias: Param::from_tensor(Tensor::zeros([e], device)).set_require_grad(false),
                top_k: self.top_k,
                sigmoid_scores: self.sigmoid_scores,
                renormalize: self.renormalize,
                score_scale: self.score_scale,
                aux_loss_weight: self.aux_loss_weight,
            },
            experts: GroupedExperts {
                w_gate: stacked(1, h, f),
                w_up: stacked(2, h, f),
                w_down: stacked(3, f, h),
            },
            bias_update_rate: self.bias_update_rate,
        }
    }
}

impl<B: ExpertParallelBackend> MoeLayer<B> {
    /// Routes, dispatches, runs this rank's experts and combines. `x` is `[T, H]`;
    /// the group's `sp_size` pads the token dimension as the contract states.
    ///
    /// # Example
    ///
    /// The same layer on one rank and split over two (each holding half the
    /// experts, the whole router) gives the same output:
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::{Tensor, TensorData};
    /// use burn_ep::moe::MoeConfig;
    /// use burn_ep::{run_ranks, EpConfig, EpGroup, RunOptions, Transport};
    ///
    /// type B = NdArray<f32>;
    /// let layer = MoeConfig::new(16, 32, 4, 2); // hidden, expert width, experts, top-k
    /// let tokens: Vec<f32> = (0..4 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let outputs = |world: usize| {
    ///     let config = EpConfig::new(world, 4, 2, 16);
    ///     run_ranks(Transport::Local, &RunOptions::default(), &config,
    ///         |_, _| Default::default(),
    ///         |group: EpGroup<B>| {
    ///             let device = group.device().clone();
    ///             let moe = layer.init::<B>(group.rank(), world, 7, &device);
    ///             // Every rank feeds the same 4 tokens here, to compare.
    ///             let x = Tensor::<B, 2>::from_data(TensorData::new(tokens.clone(), [4, 16]), &device);
    ///             let out = moe.forward(x, &group)?.out;
    ///             Ok(out.into_data().to_vec::<f32>().unwrap())
    ///         },
    ///     )
    /// };
    /// let one = outputs(1)?.remove(0)?;
    /// for out in outputs(2)? {
    ///     let out = out?;
    ///     assert!(out.iter().zip(&one).all(|(a, b)| (a - b).abs() < 1e-5));
    /// }
    /// # Ok::<(), burn_ep::EpError>(())
    /// ```
    pub fn forward(&self, x: Tensor<B, 2>, group: &EpGroup<B>) -> EpResult<MoeOutput<B>> {
        let routed = self.router.forward(x.clone());
        let d = group.dispatch(x, routed.topk_idx, routed.topk_weights)?;
        let y = self.experts.forward(d.rows, d.routing.expert_offsets());
        let out = group.combine(y, &d.routing)?;
        Ok(MoeOutput {
            out,
            aux_loss: routed.aux_loss,
            tokens_per_expert: d.routing.tokens_per_expert().to_vec(),
        })
    }
}

impl<B: Backend> MoeLayer<B> {
    /// Auxiliary-loss-free balancing: each expert's bias moves by the update rate
    /// toward the mean load (up if under-loaded, down if over-loaded). `loads` are
    /// the pairs each expert got over the whole group.
    pub fn update_bias(mut self, loads: &[usize]) -> Self {
        if self.bias_update_rate == 0.0 || loads.is_empty() {
            return self;
        }
        let mean = loads.iter().sum::<usize>() as f64 / loads.len() as f64;
        let step: Vec<f32> = loads
            .iter()
            .map(|&l| (self.bias_update_rate * (mean - l as f64).signum()) as f32)
            .collect();
        let device = self.router.bias.val().device();
        let n = step.len();
        let step = Tensor::<B, 1>::from_data(TensorData::new(step, [n]), &device);
        self.router.bias = self.router.bias.map(|b| (b + step).detach());
        self
    }

    /// Ids of the parameters that live on this rank only (the experts): gradients
    /// of all other parameters are summed across ranks.
    pub fn expert_param_ids(&self) -> Vec<ParamId> {
        vec![
            self.experts.w_gate.id,
            self.experts.w_up.id,
            self.experts.w_down.id,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::{uniform_groups, Capacity};

    #[test]
    fn uniform_groups_are_equal_and_not_empty() {
        assert_eq!(uniform_groups(&[0, 4, 8, 12]), Some(4));
        assert_eq!(uniform_groups(&[0, 4, 8, 11]), None);
        assert_eq!(uniform_groups(&[0, 0, 0]), None);
        assert_eq!(uniform_groups(&[0]), None);
    }

    #[test]
    fn capacity_pads_every_expert_to_the_largest_bucketed() {
        // Counts 3, 4, 0: capacity 4; rows keep their order.
        let c = Capacity::of(&[0, 3, 7, 7]).unwrap();
        assert_eq!((c.local, c.rows), (3, 4));
        assert_eq!(c.slot_of_row, [0, 1, 2, 4, 5, 6, 7]);
        assert_eq!(c.unfilled, [3, 8, 9, 10, 11]);
        // 100 rows: bucket 128 / 8 = 16, so 112 slots each.
        let c = Capacity::of(&[0, 100, 190]).unwrap();
        assert_eq!(c.rows, 112);
        assert_eq!(c.slot_of_row[100], 112);
    }

    #[test]
    fn capacity_declines_when_slots_would_double_the_rows() {
        // Four experts, one with 9 of the 10 rows: 4 x 10 slots.
        assert_eq!(Capacity::of(&[0, 9, 9, 9, 10]), None);
        assert_eq!(Capacity::of(&[0, 0, 0]), None);
    }
}
