//! The backend extension: the steps of dispatch and combine as backend ops.
//!
//! Every method has a default written with Burn tensor ops and host arithmetic (the
//! fallback, used by NdArray); CubeCL backends override them with the kernels of
//! `ep-kernels`. The steps follow the data flow of the book's *Architecture*; the transport between
//! `pack` and `expand` (and between `reduce` and `sum`) belongs to the group.
//!
//! Conventions shared by all implementations:
//! - `slots [T, W]`: for token `t` and rank `d`, the token's row in the send buffer,
//!   or `-1` when nothing goes to `d`. The buffer holds one contiguous segment per
//!   rank, in rank order; within a segment, rows are in token order.
//! - `positions [R, K]`: for received row `i` and top-k slot `k`, the expert-major
//!   row it expands to, or `-1` when the slot's expert is on another rank. Positions
//!   of one row increase with the local expert id, since groups are in expert order.
//!
//! No op is ever called with a zero-size tensor: the group skips empty steps.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use ep_core::layout::SendLayout;
use ep_core::{counters, validate, EpConfig, EpResult};

use crate::exchange::{
    host_exchange, host_exchange_record, ExchangeOp, ExchangeTag, SharedExchange,
};

/// How a dispatch lays out the rows it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DispatchLayout {
    /// Rows grouped by local expert, each group padded to the expert alignment: a
    /// token that chose two of this rank's experts arrives as two rows. Combine
    /// takes the experts' outputs in the same layout and applies the top-k weights.
    #[default]
    ExpertMajor,
    /// Each received token once, in source-rank order, with its destination-local
    /// expert ids and top-k weights (DeepEP's normal dispatch). Combine takes one row
    /// per received token, already weighted and summed over this rank's experts.
    RankMajor,
}

/// How the router turns its logits into scores and weights
/// ([`EpCompute::ep_router`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterScoring {
    /// Sigmoid scores (DeepSeek-V3) instead of a softmax over the experts.
    pub sigmoid: bool,
    /// Rescale each token's top-k weights to sum to one.
    pub renormalize: bool,
    /// Multiplies the top-k weights.
    pub scale: f64,
}

/// The device side of a routing handle: what moving a payload along the route
/// needs, in forward and backward passes alike. Generic over the int primitive and
/// device types so that an autodiff backend and its inner backend share it.
#[derive(Debug, Clone)]
pub struct RoutePlan<I, D> {
    /// The handle's number in its group (recording dispatches in order, so the same
    /// on every rank): what its exchanges are checked against.
    pub handle: u64,
    /// Tokens after sequence-parallel padding.
    pub tokens: usize,
    /// Rows this rank sends each rank, by destination.
    pub send_counts: Vec<usize>,
    /// Rows this rank receives from each rank, by source.
    pub recv_counts: Vec<usize>,
    /// What dispatch returned and combine takes.
    pub layout: DispatchLayout,
    /// Rows of the dispatched layout: expert-major rows with their alignment
    /// padding, or the received rows (rank-major).
    pub padded_rows: usize,
    /// The expert-major rows that are alignment padding (no slot names them).
    pub pads: Vec<u32>,
    /// The device every tensor of the plan is on.
    pub device: D,
    /// `[tokens, W]` send slots; `None` when there are no tokens.
    pub slots: Option<I>,
    /// `[received, K]` expert-major row of every received (row, slot); `None` when
    /// nothing was received, and in the rank-major layout.
    pub positions: Option<I>,
}

/// The route plan of backend `B`.
pub type Plan<B> = RoutePlan<IntTensor<B>, <B as burn::tensor::backend::BackendTypes>::Device>;

impl<I, D> RoutePlan<I, D> {
    /// The same plan with its int tensors mapped by `f`: another backend's view of
    /// it (a wrapping backend's plan as its inner backend sees it).
    pub fn map_ints<J>(&self, f: impl Fn(I) -> J) -> RoutePlan<J, D>
    where
        I: Clone,
        D: Clone,
    {
        RoutePlan {
            handle: self.handle,
            tokens: self.tokens,
            send_counts: self.send_counts.clone(),
            recv_counts: self.recv_counts.clone(),
            layout: self.layout,
            padded_rows: self.padded_rows,
            pads: self.pads.clone(),
            device: self.device.clone(),
            slots: self.slots.clone().map(&f),
            positions: self.positions.clone().map(&f),
        }
    }

    /// Rows this rank sends, its own included.
    pub fn sent_rows(&self) -> usize {
        self.send_counts.iter().sum()
    }

    /// Rows this rank receives, its own included.
    pub fn received_rows(&self) -> usize {
        self.recv_counts.iter().sum()
    }

    /// The send slots, when this rank sends any rows (what a pack needs).
    pub fn send_slots(&self) -> Option<&I> {
        self.slots.as_ref().filter(|_| self.sent_rows() > 0)
    }

    /// Whether the plan's layout is rank-major (each received token once).
    pub fn rank_major(&self) -> bool {
        self.layout == DispatchLayout::RankMajor
    }
}

/// What the layout step returns.
#[derive(Debug, Clone)]
pub struct LayoutOutput<B: Backend> {
    /// `[T, W]` slots (see the module docs).
    pub slots: IntTensor<B>,
    /// Tokens this rank sends to each rank.
    pub send_counts: Vec<usize>,
    /// (token, expert) pairs this rank sends to each global expert.
    pub tokens_per_expert: Vec<usize>,
}

/// What pack returns: the send buffer `[S, H]` and, when recording, the sent rows'
/// destination-local expert ids `[S, K]`.
pub type Packed<B> = (FloatTensor<B>, Option<IntTensor<B>>);

/// The three payloads of a recording dispatch, which move in one exchange: rows
/// `[S, H]`, their top-k weights `[S, K]` and destination-local expert ids `[S, K]`.
#[derive(Debug, Clone)]
pub struct RecordRows<B: Backend> {
    /// `[S, H]` rows in send order.
    pub rows: FloatTensor<B>,
    /// `[S, K]` each sent row's top-k weights.
    pub weights: FloatTensor<B>,
    /// `[S, K]` each sent row's expert ids, local to its destination (`-1`: not
    /// there).
    pub expert_ids: IntTensor<B>,
}

/// What a recording dispatch's route returns: the rows in the plan's layout, and
/// the received weights and destination-local expert ids `[R, K]` (`None` when
/// nothing came).
pub type RecordedRoute<B> = (FloatTensor<B>, Option<(FloatTensor<B>, IntTensor<B>)>);

/// The routing metadata a recording pack derives beside the rows. (The weights are
/// not metadata: they travel as a payload of their own, differentiably.)
#[derive(Debug, Clone)]
pub struct PackMeta<B: Backend> {
    /// `[T, K]` global expert ids.
    pub topk_idx: IntTensor<B>,
    /// Experts each rank holds: an id's rank is `id / experts_per_rank`.
    pub experts_per_rank: usize,
}

/// Backends that can run dispatch and combine: the compute steps
/// ([`EpCompute`]) and the way rows move between ranks ([`EpCommunication`]).
/// Implemented for every backend that has both; a program names only this bound
/// (`B: ExpertParallelBackend`), a backend implements the two traits.
pub trait ExpertParallelBackend: EpCompute + EpCommunication {}

impl<B: EpCompute + EpCommunication> ExpertParallelBackend for B {}

/// The compute steps of dispatch and combine, and of the MoE layer around them:
/// kernels on one rank's tensors, which hold no transport.
///
/// The steps are not differentiable one by one: on `Autodiff` they run on the inner
/// backend, outside the graph. The differentiable operations are [`EpGroup`]'s, which
/// compose these steps with their backward passes.
///
/// [`EpGroup`]: crate::EpGroup
pub trait EpCompute: Backend {
    /// Layout and slots: validates `topk_idx [T, K]` (ids in `-1..E`, no duplicates),
    /// and gives every (token, rank) its slot by prefix sums, in token order.
    fn ep_layout(topk_idx: IntTensor<Self>, config: &EpConfig) -> EpResult<LayoutOutput<Self>> {
        let topk_idx = int::<Self, 2>(topk_idx);
        let [tokens, _] = topk_idx.dims();
        let device = topk_idx.device();
        let ids = host_ints(topk_idx);
        validate::check_topk_idx(config, &ids)?;
        let world = config.world_size;
        let layout = SendLayout::new(config, &ids);
        // Rows of the send buffer: segments in rank order, tokens in order within.
        let mut slots = vec![-1i64; tokens * world];
        let mut row = 0;
        for (d, sent) in layout.tokens_per_rank.iter().enumerate() {
            for &t in sent {
                slots[t * world + d] = row;
                row += 1;
            }
        }
        let send_counts = layout.send_counts();
        let tokens_per_expert = layout.tokens_per_expert;
        Ok(LayoutOutput {
            slots: int_tensor::<Self, 2>(slots, [tokens, world], &device).into_primitive(),
            send_counts,
            tokens_per_expert,
        })
    }

    /// Pack: the rows of `x [T, H]` into the send buffer `[S, H]` following `slots`.
    /// When recording, also the metadata of every sent row: its slots as
    /// destination-local expert ids `[S, K]` (`-1` where the slot's expert is on
    /// another rank). Replays pass no `meta`.
    fn ep_pack(
        x: FloatTensor<Self>,
        slots: IntTensor<Self>,
        sent_rows: usize,
        meta: Option<PackMeta<Self>>,
    ) -> Packed<Self> {
        let x = float::<Self, 2>(x);
        let device = x.device();
        let slots = int::<Self, 2>(slots);
        let world = slots.dims()[1];
        let slots = host_ints(slots);
        let mut source = vec![0i64; sent_rows];
        let mut dest = vec![0usize; sent_rows];
        for (at, &s) in slots.iter().enumerate() {
            if s >= 0 {
                source[s as usize] = (at / world) as i64;
                dest[s as usize] = at % world;
            }
        }
        let meta = meta.map(|m| {
            let ids = int::<Self, 2>(m.topk_idx);
            let k = ids.dims()[1];
            let ids = host_ints(ids);
            let per_rank = m.experts_per_rank as i64;
            let local: Vec<i64> = source
                .iter()
                .zip(&dest)
                .flat_map(|(&t, &d)| {
                    ids[t as usize * k..(t as usize + 1) * k]
                        .iter()
                        .map(move |&e| {
                            if e >= 0 && e / per_rank == d as i64 {
                                e % per_rank
                            } else {
                                -1
                            }
                        })
                })
                .collect();
            int_tensor::<Self, 2>(local, [sent_rows, k], &device).into_primitive()
        });
        let index = int_tensor::<Self, 1>(source, [sent_rows], &device);
        (x.select(0, index).into_primitive().tensor(), meta)
    }

    /// Receive-side slots: the expert-major row of every (received row, slot), from
    /// the received local expert ids `[R, K]` and each local expert's padded group
    /// start (`expert_offsets`, one entry per local expert).
    fn ep_expert_positions(
        recv_local: IntTensor<Self>,
        expert_offsets: &[usize],
    ) -> IntTensor<Self> {
        let recv_local = int::<Self, 2>(recv_local);
        let shape = recv_local.dims();
        let device = recv_local.device();
        let mut next: Vec<i64> = expert_offsets.iter().map(|&o| o as i64).collect();
        let positions = host_ints(recv_local)
            .into_iter()
            .map(|j| {
                if j < 0 {
                    return -1;
                }
                next[j as usize] += 1;
                next[j as usize] - 1
            })
            .collect();
        int_tensor::<Self, 2>(positions, shape, &device).into_primitive()
    }

    /// Expand: received rows `[R, H]` to expert-major rows `[P, H]`; the pad rows
    /// (`pads`, which no position names) zero. (This default gathers, and finds the
    /// pads itself.)
    fn ep_expand(
        rows: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        _pads: &[u32],
    ) -> FloatTensor<Self> {
        let rows = float::<Self, 2>(rows);
        let [received, hidden] = rows.dims();
        let (device, dtype) = (rows.device(), rows.dtype());
        let positions = host_ints(int::<Self, 2>(positions));
        let k = positions.len() / received;
        let mut source = vec![received as i64; padded_rows];
        for (slot, &p) in positions.iter().enumerate() {
            if p >= 0 {
                source[p as usize] = (slot / k) as i64;
            }
        }
        let zero = Tensor::zeros([1, hidden], (&device, dtype));
        let index = int_tensor::<Self, 1>(source, [padded_rows], &device);
        Tensor::cat(vec![rows, zero], 0)
            .select(0, index)
            .into_primitive()
            .tensor()
    }

    /// The weight of every expert-major row `[P]` from the received weights `[R, K]`;
    /// zero on the pad rows `pads` (this default finds them itself).
    fn ep_expand_weights(
        weights: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        _pads: &[u32],
    ) -> FloatTensor<Self> {
        let weights = float::<Self, 2>(weights);
        let [received, k] = weights.dims();
        let (device, dtype) = (weights.device(), weights.dtype());
        let mut source = vec![(received * k) as i64; padded_rows];
        for (slot, &p) in host_ints(int::<Self, 2>(positions)).iter().enumerate() {
            if p >= 0 {
                source[p as usize] = slot as i64;
            }
        }
        let flat = Tensor::cat(
            vec![
                weights.reshape([received * k]),
                Tensor::zeros([1], (&device, dtype)),
            ],
            0,
        );
        flat.select(0, int_tensor::<Self, 1>(source, [padded_rows], &device))
            .into_primitive()
            .tensor()
    }

    /// Reduce: for every received row, the sum over its local experts (ascending) of
    /// weight × expert output, from `y [P, H]`; gives `[R, H]`. The adjoint of expand.
    fn ep_reduce(
        y: FloatTensor<Self>,
        positions: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = float::<Self, 2>(y);
        let [padded_rows, _] = y.dims();
        let dtype = y.dtype();
        // The default expand of the weights finds the pads itself.
        let row_weights = float::<Self, 1>(Self::ep_expand_weights(
            weights,
            positions.clone(),
            padded_rows,
            &[],
        ));
        let weighted = y * row_weights.cast(dtype).reshape([padded_rows, 1]);
        let positions = int::<Self, 2>(positions);
        let [received, k] = positions.dims();
        let mut contributions: Vec<Vec<i64>> = host_ints(positions)
            .chunks(k)
            .map(|row| row.iter().copied().filter(|&p| p >= 0).collect())
            .collect();
        contributions.iter_mut().for_each(|c| c.sort_unstable());
        // The q-th term of every row: its q-th contribution, or nothing.
        let most = contributions.iter().map(Vec::len).max().unwrap_or(0);
        let terms = (0..most)
            .map(|q| {
                contributions
                    .iter()
                    .map(|c| c.get(q).copied().unwrap_or(-1))
                    .collect()
            })
            .collect();
        sum_of_gathers(weighted, terms, received)
    }

    /// The backward of combine on the expert side: `grad [R, H]` holds each
    /// received row's gradient (routed back like a dispatch). Returns `grad_y
    /// [P, H]` when `with_grad_y`: every expert-major row's weight times its received
    /// row's gradient, pad rows zero. And `grad_w [R, K]` when `y` is given: each
    /// slot's dot product of the gradient with its expert output, zero on `-1`
    /// slots. (This default is made of Burn ops; CubeCL backends fuse it.)
    #[allow(clippy::too_many_arguments)]
    fn ep_combine_grad(
        grad: FloatTensor<Self>,
        y: Option<FloatTensor<Self>>,
        weights: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
        with_grad_y: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let dtype = grad.dtype();
        let weights_dtype = weights.dtype();
        let p = padded_rows;
        // Each expert-major row gets its received row's gradient.
        let expanded = float::<Self, 2>(Self::ep_expand(grad, positions.clone(), p, pads));
        let grad_y = with_grad_y.then(|| {
            let row_w =
                float::<Self, 1>(Self::ep_expand_weights(weights, positions.clone(), p, pads));
            (expanded.clone() * row_w.cast(dtype).reshape([p, 1]))
                .into_primitive()
                .tensor()
        });
        let grad_w = y.map(|y| {
            let dots = (expanded * float::<Self, 2>(y)).sum_dim(1).reshape([p]);
            gather_by_positions::<Self>(dots, positions, weights_dtype)
        });
        (grad_y, grad_w)
    }

    /// Places row `i` of `rows [N, H]` at row `slots[i]` of a new `[out_rows, H]`;
    /// the rows no slot names (`unfilled`, listed by the caller) are zero. Slots are
    /// distinct. Its adjoint is [`Self::ep_take_rows`]. (This default is Burn's
    /// `select_assign`; CubeCL backends run the expand kernel, since Burn 0.21's
    /// `select_assign` runs on a handful of cubes.)
    fn ep_place_rows(
        rows: FloatTensor<Self>,
        slots: IntTensor<Self>,
        out_rows: usize,
        _unfilled: &[u32],
    ) -> FloatTensor<Self> {
        let rows = float::<Self, 2>(rows);
        let [n, hidden] = rows.dims();
        let index = int::<Self, 2>(slots).reshape([n]);
        Tensor::<Self, 2>::zeros([out_rows, hidden], (&rows.device(), rows.dtype()))
            .select_assign(0, index, rows, burn::tensor::IndexingUpdateOp::Add)
            .into_primitive()
            .tensor()
    }

    /// Row `slots[i]` of `source [M, H]` for every `i`: `[N, H]`. The adjoint of
    /// [`Self::ep_place_rows`]; `unfilled` lists the source rows no slot names (their
    /// gradient is zero).
    fn ep_take_rows(
        source: FloatTensor<Self>,
        slots: IntTensor<Self>,
        _unfilled: &[u32],
    ) -> FloatTensor<Self> {
        let index = int::<Self, 2>(slots);
        let n = index.dims()[0];
        float::<Self, 2>(source)
            .select(0, index.reshape([n]))
            .into_primitive()
            .tensor()
    }

    /// The batched product `op(a) · op(b)`: `[G, M, N]`, from `a [G, M, K]` and
    /// `b [G, K, N]`, where an operand whose flag is set is given transposed
    /// (`[G, K, M]`, `[G, N, K]`) and read as its transpose. The MoE layer's experts;
    /// the flags let its backward pass read the saved operands as they are. (This
    /// default is Burn's matmul; CubeCL backends run cuBLAS on CUDA.)
    fn ep_batched_matmul(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        burn_batched_matmul::<Self>(a, b, transpose_a, transpose_b)
    }

    /// SwiGLU's element-wise part, `silu(gate) · up`, for `gate` and `up` of one
    /// shape. (This default is Burn's `silu` and a product; CubeCL backends run one
    /// kernel, in f32 inside.)
    fn ep_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let gate = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(gate));
        let up = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(up));
        (burn::tensor::activation::silu(gate) * up)
            .into_primitive()
            .tensor()
    }

    /// The gradients of [`Self::ep_swiglu`] from its output's gradient `grad`:
    /// `(grad_gate, grad_up)`, with `grad_up = grad · silu(gate)` and
    /// `grad_gate = grad · up · σ(gate) · (1 + gate · (1 − σ(gate)))`.
    fn ep_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let float = |t| Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(t));
        let (gate, up, grad) = (float(gate), float(up), float(grad));
        let s = burn::tensor::activation::sigmoid(gate.clone());
        let grad_up = grad.clone() * gate.clone() * s.clone();
        let slope = (gate * (s.clone().neg() + 1.0) + 1.0) * s;
        let grad_gate = grad * up * slope;
        (
            grad_gate.into_primitive().tensor(),
            grad_up.into_primitive().tensor(),
        )
    }

    /// The columns of each row's `k` largest values of `scores [T, E]`, largest
    /// first, `[T, k]`: the router's choice. Not differentiable. (This default is
    /// Burn's `topk_with_indices`, which sorts on the host on CubeCL backends in
    /// Burn 0.21; CubeCL backends run a kernel, of equal scores the lower column
    /// first.)
    fn ep_topk_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        float::<Self, 2>(scores)
            .topk_with_indices(k, 1)
            .1
            .into_primitive()
    }

    /// The router after its product: from `logits [T, E]`, the scores (softmax over
    /// the experts or sigmoid), the choice of the `k` largest `score + bias` (`bias
    /// [E]`, steering the choice only; largest first, of equal values the lower
    /// expert first) and the chosen scores as weights, renormalised and scaled as
    /// `scoring` says: `(topk_idx [T, k], topk_weights [T, k])`. The weights are
    /// differentiable in `logits` (see [`Self::ep_router_grad`]). (This default is
    /// Burn's ops; CubeCL backends run one kernel each way.)
    fn ep_router(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        k: usize,
        scoring: RouterScoring,
    ) -> (IntTensor<Self>, FloatTensor<Self>) {
        let scores = router_scores::<Self>(float(logits), scoring.sigmoid);
        let biased = scores.clone() + float::<Self, 1>(bias).unsqueeze_dim(0);
        let idx = Self::ep_topk_indices(biased.into_primitive().tensor(), k);
        let mut weights = scores.gather(1, int::<Self, 2>(idx.clone()));
        if scoring.renormalize {
            weights = weights.clone() / (weights.sum_dim(1) + 1e-20);
        }
        (idx, (weights * scoring.scale).into_primitive().tensor())
    }

    /// The gradient of [`Self::ep_router`]'s weights in its logits, `[T, E]`, from
    /// the weights' gradient `grad [T, k]` and the choice `topk_idx` it made.
    fn ep_router_grad(
        logits: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        grad: FloatTensor<Self>,
        scoring: RouterScoring,
    ) -> FloatTensor<Self> {
        let scores = router_scores::<Self>(float(logits), scoring.sigmoid);
        let idx = int::<Self, 2>(topk_idx);
        let grad = float::<Self, 2>(grad) * scoring.scale;
        let chosen = scores.clone().gather(1, idx.clone());
        // d(loss)/d(chosen score), through the renormalisation.
        let d_chosen = if scoring.renormalize {
            let sum = chosen.clone().sum_dim(1) + 1e-20;
            let weighted = (grad.clone() * chosen).sum_dim(1);
            (grad - weighted / sum.clone()) / sum
        } else {
            grad
        };
        let d_scores =
            scores
                .zeros_like()
                .scatter(1, idx, d_chosen, burn::tensor::IndexingUpdateOp::Add);
        let d_logits = if scoring.sigmoid {
            d_scores * scores.clone() * (scores.neg() + 1.0)
        } else {
            let dot = (d_scores.clone() * scores.clone()).sum_dim(1);
            scores * (d_scores - dot)
        };
        d_logits.into_primitive().tensor()
    }

    /// Sum: the source side of combine. `back [S, H]` holds what each rank sent back,
    /// in the send buffer's layout; every token sums its rows in rank order.
    fn ep_sum(back: FloatTensor<Self>, slots: IntTensor<Self>) -> FloatTensor<Self> {
        let back = float::<Self, 2>(back);
        let slots = int::<Self, 2>(slots);
        let [tokens, world] = slots.dims();
        let slots = host_ints(slots);
        // One term per rank, in rank order: the token's row from that rank, or nothing.
        let terms = (0..world)
            .map(|d| (0..tokens).map(|t| slots[t * world + d]).collect())
            .collect();
        sum_of_gathers(back, terms, tokens)
    }

    /// Zeros of `shape` that depend on `parent` in the autodiff graph, with a zero
    /// derivative, made without a kernel on a zero-size tensor on either side: the
    /// router weights and the loss of a rank with no tokens (see `crate::zero_size`).
    /// Off autodiff, plain zeros.
    fn ep_zeros_after(parent: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        zeros_of::<Self>(shape, &Self::float_device(&parent), parent.dtype())
    }
}

/// How a backend moves rows between ranks: the exchanges of the group's transport
/// ([`SharedExchange`]), and the routes that compose them with the compute steps
/// (pack, exchange, expand; reduce, exchange, sum). The defaults move host data
/// through the transport's control path; CubeCL backends hand device buffers to a
/// device transport instead, and fuse a route's steps where that saves a pass.
pub trait EpCommunication: EpCompute {
    /// The all-to-all-v of a send buffer `[S, cols]` (segments in rank order,
    /// `send_counts` rows each): returns what the ranks sent here, `[R, C]` in
    /// source-rank order with `recv_counts` rows each (`None` when nothing came).
    /// The default moves host data; CubeCL backends use a transport's device path
    /// where it has one. Every rank checks first that its peers are making the
    /// exchange `tag` names, with the row counts it expects.
    #[allow(clippy::too_many_arguments)]
    fn ep_exchange(
        tag: ExchangeTag,
        rows: Option<FloatTensor<Self>>,
        _cols: usize,
        dtype: DType,
        send_counts: &[usize],
        recv_counts: &[usize],
        device: &Self::Device,
        exchange: &SharedExchange,
    ) -> EpResult<Option<FloatTensor<Self>>> {
        host_exchange::<Self>(tag, rows, dtype, send_counts, recv_counts, device, exchange)
    }

    /// The exchange of a recording dispatch: the packed rows, their weights and
    /// their destination-local expert ids (`None` when nothing is sent) move
    /// together, in one exchange; returns what came (`None` when nothing did).
    /// `dtypes` are the rows' and the weights'. The default moves host data.
    #[allow(clippy::too_many_arguments)]
    fn ep_exchange_record(
        tag: ExchangeTag,
        sent: Option<RecordRows<Self>>,
        _columns: [usize; 2],
        dtypes: [DType; 2],
        send_counts: &[usize],
        recv_counts: &[usize],
        device: &Self::Device,
        exchange: &SharedExchange,
    ) -> EpResult<Option<RecordRows<Self>>> {
        host_exchange_record::<Self>(
            tag,
            sent,
            dtypes,
            send_counts,
            recv_counts,
            device,
            exchange,
        )
    }

    /// The route of a recording dispatch: `x [T, H]` and `weights [T, K]` are packed,
    /// the weights' pack deriving each sent row's destination-local expert ids from
    /// `topk_idx`, and all three move in one exchange. Returns the rows in the plan's
    /// layout, as [`Self::ep_dispatch_rows`] does, and the received weights and
    /// destination-local expert ids, `[R, K]` each (`None` when nothing came). In
    /// the expert-major layout the received ids give `plan.positions` (from each
    /// local expert's group start, `expert_offsets`), and the rows are expanded.
    fn ep_record_route(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        expert_offsets: &[usize],
        plan: &mut Plan<Self>,
        exchange: &SharedExchange,
    ) -> EpResult<RecordedRoute<Self>> {
        record_route_in_steps::<Self>(x, weights, topk_idx, expert_offsets, plan, exchange)
    }

    /// Route rows: `x [T, C]` packed and sent along the route; returns the received
    /// rows `[R, C]` in source-rank order (`None` when nothing was received). `op`
    /// names the exchange for the peers' check.
    fn ep_route_rows(
        x: FloatTensor<Self>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<Option<FloatTensor<Self>>> {
        route_rows_in_steps::<Self>(x, plan, exchange, op)
    }

    /// Return rows: received-side rows `[R, C]` sent back to their sources, where each
    /// token sums what came back in rank order; returns `[T, C]`. The adjoint of
    /// `ep_route_rows`.
    fn ep_return_rows(
        rows: Option<FloatTensor<Self>>,
        cols: usize,
        dtype: DType,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<FloatTensor<Self>> {
        return_rows_in_steps::<Self>(rows, cols, dtype, plan, exchange, op)
    }

    /// Dispatch of a payload along a recorded route, a cached dispatch: `x [T, H]` to
    /// expert-major rows `[P, H]` (route, then expand), or to the received rows
    /// `[R, H]` (rank-major: the route alone).
    fn ep_dispatch_rows(
        x: FloatTensor<Self>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
    ) -> EpResult<FloatTensor<Self>> {
        let x_t = float::<Self, 2>(x.clone());
        let (hidden, dtype) = (x_t.dims()[1], x_t.dtype());
        let received = Self::ep_route_rows(x, plan, exchange, ExchangeOp::Rows)?;
        Ok(match (received, &plan.positions) {
            (Some(rows), _) if plan.rank_major() => rows,
            (Some(rows), Some(positions)) => {
                Self::ep_expand(rows, positions.clone(), plan.padded_rows, &plan.pads)
            }
            _ => zeros::<Self>([plan.padded_rows, hidden], &plan.device, dtype),
        })
    }

    /// Combine along a recorded route: expert outputs `y [P, H]` and received weights
    /// `[R, K]` to `[T, H]` (reduce, then return). In the rank-major layout `y` is
    /// `[R, H]`, already reduced, and returns as it is; `weights` are not read (an
    /// autodiff backend keeps them as a parent, with a zero gradient). `op` names the
    /// exchange: a combine, or the backward of a dispatch.
    fn ep_combine_rows(
        y: FloatTensor<Self>,
        weights: Option<FloatTensor<Self>>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<FloatTensor<Self>> {
        let y_t = float::<Self, 2>(y.clone());
        let (hidden, dtype) = (y_t.dims()[1], y_t.dtype());
        let reduced = match (weights, &plan.positions) {
            _ if plan.rank_major() => Some(y).filter(|_| plan.received_rows() > 0),
            (Some(weights), Some(positions)) => {
                Some(Self::ep_reduce(y, positions.clone(), weights))
            }
            _ => None,
        };
        Self::ep_return_rows(reduced, hidden, dtype, plan, exchange, op)
    }
}

/// [`EpCommunication::ep_record_route`] made of the backend's steps: two
/// packs, the exchange of three planes, and (expert-major) positions and expand.
pub(crate) fn record_route_in_steps<B: ExpertParallelBackend>(
    x: FloatTensor<B>,
    weights: FloatTensor<B>,
    topk_idx: IntTensor<B>,
    expert_offsets: &[usize],
    plan: &mut Plan<B>,
    exchange: &SharedExchange,
) -> EpResult<RecordedRoute<B>> {
    let ([_, hidden], [_, top_k]) = (x.shape().dims(), weights.shape().dims());
    let dtypes = [x.dtype(), weights.dtype()];
    let sent = plan.send_slots().map(|slots| {
        let rows = B::ep_pack(x, slots.clone(), plan.sent_rows(), None).0;
        let meta = PackMeta {
            topk_idx,
            experts_per_rank: expert_offsets.len(),
        };
        let (weights, ids) = B::ep_pack(weights, slots.clone(), plan.sent_rows(), Some(meta));
        RecordRows {
            rows,
            weights,
            expert_ids: ids.expect("a recording pack returns its metadata"),
        }
    });
    let received = B::ep_exchange_record(
        ExchangeTag::new(plan.handle, ExchangeOp::Record),
        sent,
        [hidden, top_k],
        dtypes,
        &plan.send_counts,
        &plan.recv_counts,
        &plan.device,
        exchange,
    )?;
    Ok(record_layout::<B>(
        received,
        hidden,
        dtypes[0],
        expert_offsets,
        plan,
    ))
}

/// What a recording dispatch returns from what its exchange `received`: the rows
/// in the plan's layout (expanded expert-major, after deriving `plan.positions`
/// from the received ids; zeros of `dtype` when nothing came) and the received
/// weights and expert ids.
pub(crate) fn record_layout<B: ExpertParallelBackend>(
    received: Option<RecordRows<B>>,
    hidden: usize,
    dtype: DType,
    expert_offsets: &[usize],
    plan: &mut Plan<B>,
) -> RecordedRoute<B> {
    let Some(received) = received else {
        let rows = zeros::<B>([plan.padded_rows, hidden], &plan.device, dtype);
        return (rows, None);
    };
    let ids = received.expert_ids;
    if plan.rank_major() {
        return (received.rows, Some((received.weights, ids)));
    }
    let positions = B::ep_expert_positions(ids.clone(), expert_offsets);
    plan.positions = Some(positions.clone());
    let rows = B::ep_expand(received.rows, positions, plan.padded_rows, &plan.pads);
    (rows, Some((received.weights, ids)))
}

/// [`EpCommunication::ep_route_rows`] made of the backend's steps: a pack,
/// then the exchange.
pub(crate) fn route_rows_in_steps<B: ExpertParallelBackend>(
    x: FloatTensor<B>,
    plan: &Plan<B>,
    exchange: &SharedExchange,
    op: ExchangeOp,
) -> EpResult<Option<FloatTensor<B>>> {
    let x_t = float::<B, 2>(x.clone());
    let (cols, dtype) = (x_t.dims()[1], x_t.dtype());
    let packed = plan
        .send_slots()
        .map(|slots| B::ep_pack(x, slots.clone(), plan.sent_rows(), None).0);
    B::ep_exchange(
        ExchangeTag::new(plan.handle, op),
        packed,
        cols,
        dtype,
        &plan.send_counts,
        &plan.recv_counts,
        &plan.device,
        exchange,
    )
}

/// [`EpCommunication::ep_return_rows`] made of the backend's steps: the
/// exchange, then the sum.
pub(crate) fn return_rows_in_steps<B: ExpertParallelBackend>(
    rows: Option<FloatTensor<B>>,
    cols: usize,
    dtype: DType,
    plan: &Plan<B>,
    exchange: &SharedExchange,
    op: ExchangeOp,
) -> EpResult<FloatTensor<B>> {
    let back = B::ep_exchange(
        ExchangeTag::new(plan.handle, op),
        rows,
        cols,
        dtype,
        &plan.recv_counts,
        &plan.send_counts,
        &plan.device,
        exchange,
    )?;
    Ok(match (back, &plan.slots) {
        (Some(back), Some(slots)) => B::ep_sum(back, slots.clone()),
        _ => zeros::<B>([plan.tokens, cols], &plan.device, dtype),
    })
}

/// [`EpCompute::ep_batched_matmul`] on Burn's matmul: a transposed
/// operand is a view with its last two dims swapped.
pub(crate) fn burn_batched_matmul<B: Backend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    transpose_a: bool,
    transpose_b: bool,
) -> FloatTensor<B> {
    let read = |t: FloatTensor<B>, transposed: bool| match transposed {
        false => float::<B, 3>(t),
        true => float::<B, 3>(t).swap_dims(1, 2),
    };
    read(a, transpose_a)
        .matmul(read(b, transpose_b))
        .into_primitive()
        .tensor()
}

/// `out[i, k] = values[positions[i, k]]`, or zero where the position is `-1`.
fn gather_by_positions<B: Backend>(
    values: Tensor<B, 1>,
    positions: IntTensor<B>,
    dtype: DType,
) -> FloatTensor<B> {
    let positions = Tensor::<B, 2, Int>::from_primitive(positions);
    let [rows, k] = positions.dims();
    let p = values.dims()[0];
    let device = values.device();
    let missing = positions.clone().lower_elem(0);
    let index = positions.mask_fill(missing, p as i64).reshape([rows * k]);
    let zero = Tensor::zeros([1], (&device, values.dtype()));
    let extended = Tensor::cat(vec![values, zero], 0);
    extended
        .select(0, index)
        .reshape([rows, k])
        .cast(dtype)
        .into_primitive()
        .tensor()
}

/// `sum over terms of rows[index]`, row by row, in term order; an index of `-1`
/// adds nothing. `terms` each hold one index per output row.
fn sum_of_gathers<B: Backend>(
    rows: Tensor<B, 2>,
    terms: Vec<Vec<i64>>,
    out_rows: usize,
) -> FloatTensor<B> {
    let [n, hidden] = rows.dims();
    let (device, dtype) = (rows.device(), rows.dtype());
    let rows = Tensor::cat(vec![rows, Tensor::zeros([1, hidden], (&device, dtype))], 0);
    let mut acc: Option<Tensor<B, 2>> = None;
    for index in terms {
        if index.iter().all(|&i| i < 0) {
            continue;
        }
        let index = index
            .into_iter()
            .map(|i| if i < 0 { n as i64 } else { i })
            .collect();
        let term = rows
            .clone()
            .select(0, int_tensor::<B, 1>(index, [out_rows], &device));
        acc = Some(match acc {
            Some(acc) => acc + term,
            None => term,
        });
    }
    acc.unwrap_or_else(|| zeros_tensor::<B, 2>([out_rows, hidden], &device, dtype))
        .into_primitive()
        .tensor()
}

pub(crate) fn int<B: Backend, const D: usize>(t: IntTensor<B>) -> Tensor<B, D, Int> {
    Tensor::from_primitive(t)
}

pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn upload<B: Backend>(
    data: TensorData,
    device: &B::Device,
    dtype: DType,
) -> FloatTensor<B> {
    Tensor::<B, 2>::from_data(data, (device, dtype))
        .into_primitive()
        .tensor()
}

pub(crate) fn zeros<B: Backend>(
    shape: [usize; 2],
    device: &B::Device,
    dtype: DType,
) -> FloatTensor<B> {
    zeros_of::<B>(Shape::new(shape), device, dtype)
}

/// Zeros of any rank. A zero-size tensor is allocated without a kernel launch: CUDA
/// refuses to launch a grid of zero blocks, which a zero-size fill would be.
pub(crate) fn zeros_of<B: Backend>(
    shape: Shape,
    device: &B::Device,
    dtype: DType,
) -> FloatTensor<B> {
    if shape.num_elements() == 0 {
        B::float_empty(shape, device, dtype.into())
    } else {
        B::float_zeros(shape, device, dtype.into())
    }
}

/// [`zeros_of`] as a tensor of `D` dimensions.
pub(crate) fn zeros_tensor<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(zeros_of::<B>(
        Shape::new(shape),
        device,
        dtype,
    )))
}

pub(crate) fn int_tensor<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

pub(crate) fn host_ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    counters::host_sync();
    t.into_data().iter::<i64>().collect()
}

/// NdArray takes every default: Burn-op steps, and rows moved as host data.
macro_rules! ndarray_takes_the_defaults {
    ($($extension:ident),*) => {$(
        impl<E, I, Q> $extension for burn::backend::NdArray<E, I, Q>
        where
            E: burn::backend::ndarray::FloatNdArrayElement,
            I: burn::backend::ndarray::IntNdArrayElement,
            Q: burn::backend::ndarray::QuantElement,
            burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>
                + From<burn::backend::ndarray::SharedArray<I>>,
        {
        }
    )*};
}

ndarray_takes_the_defaults!(EpCompute, EpCommunication);

/// Softmax over the experts, or sigmoid, of `logits [T, E]` in Burn ops.
fn router_scores<B: Backend>(logits: Tensor<B, 2>, sigmoid: bool) -> Tensor<B, 2> {
    if sigmoid {
        burn::tensor::activation::sigmoid(logits)
    } else {
        burn::tensor::activation::softmax(logits, 1)
    }
}
