//! `EpCompute` and `EpCommunication` for `Autodiff<B>`: dispatch, cached dispatch and combine
//! are differentiable through two adjoint pairs, replaying the routing plan:
//!
//! - dispatch ↔ combine: the backward of a dispatch is an unweighted combine of the
//!   gradient; the backward of a combine is a replayed dispatch of the gradient
//!   (route), then the adjoint of the weighted reduce: an expand of the gradient
//!   scaled by the weights for the expert outputs, and row-wise dot products of the
//!   expanded gradient with the expert outputs for the weights.
//! - the weights' own route ↔ return: the gradient of the received weights goes back
//!   to the tokens' ranks and is summed there.
//!
//! The backward passes never redo layout or the count exchange: the plan (slots,
//! positions, counts) lives in the backward state, with the exchange. They move
//! data between ranks, so every rank runs them in the same order: the reverse of
//! the forward order, whatever the rest of each rank's graph looks like (see
//! `crate::order`). Every exchange is checked against its peers' (see
//! `crate::exchange`); a failure inside a backward pass panics (Burn's backward
//! cannot return errors), naming the rank, the handle and the cause; forward calls
//! return `EpError`.
//!
//! The plain steps (layout, pack, expand, ...) run on the inner backend, untracked.

use std::any::Any;
use std::fmt;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Shape, Tensor, TensorMetadata};
use ep_core::{EpConfig, EpError, EpResult};

use crate::backend::{
    zeros_of, EpCommunication, EpCompute, ExpertParallelBackend, LayoutOutput, PackMeta, Packed,
    Plan, RecordRows, RecordedRoute, RouterScoring,
};
use crate::exchange::{ExchangeOp, ExchangeTag, SharedExchange};
use crate::order::PendingToken;

/// Registers a gradient for a parent node, where Burn adds it to what is there. A
/// zero-size gradient is not added to another: CUDA refuses the zero-size launch of
/// the addition, and either one is the sum. (A macro, since Burn does not let other
/// crates name its node type: the probe is a tensor on the parent's node.)
macro_rules! register {
    ($backend:ty, $grads:expr, $parent:expr, $grad:expr) => {{
        let (parent, grad) = ($parent, $grad);
        let mut probe = <FloatTensor<Autodiff<$backend>>>::new(grad.clone());
        probe.rc = std::sync::Arc::new(parent.id);
        probe.node = parent;
        register_on::<$backend>($grads, probe, grad)
    }};
}

impl<B: ExpertParallelBackend, C: CheckpointStrategy> EpCompute for Autodiff<B, C> {
    fn ep_layout(topk_idx: IntTensor<Self>, config: &EpConfig) -> EpResult<LayoutOutput<Self>> {
        let out = B::ep_layout(topk_idx, config)?;
        Ok(LayoutOutput {
            slots: out.slots,
            send_counts: out.send_counts,
            tokens_per_expert: out.tokens_per_expert,
        })
    }

    fn ep_pack(
        x: FloatTensor<Self>,
        slots: IntTensor<Self>,
        sent_rows: usize,
        meta: Option<PackMeta<Self>>,
    ) -> Packed<Self> {
        let meta = meta.map(|m| PackMeta {
            topk_idx: m.topk_idx,
            experts_per_rank: m.experts_per_rank,
        });
        let (rows, local) = B::ep_pack(Self::inner(x), slots, sent_rows, meta);
        (Self::from_inner(rows), local)
    }

    fn ep_expert_positions(
        recv_local: IntTensor<Self>,
        expert_offsets: &[usize],
    ) -> IntTensor<Self> {
        B::ep_expert_positions(recv_local, expert_offsets)
    }

    fn ep_expand(
        rows: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
    ) -> FloatTensor<Self> {
        Self::from_inner(B::ep_expand(
            Self::inner(rows),
            positions,
            padded_rows,
            pads,
        ))
    }

    fn ep_expand_weights(
        weights: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
    ) -> FloatTensor<Self> {
        Self::from_inner(B::ep_expand_weights(
            Self::inner(weights),
            positions,
            padded_rows,
            pads,
        ))
    }

    fn ep_reduce(
        y: FloatTensor<Self>,
        positions: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::ep_reduce(
            Self::inner(y),
            positions,
            Self::inner(weights),
        ))
    }

    fn ep_sum(back: FloatTensor<Self>, slots: IntTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::ep_sum(Self::inner(back), slots))
    }

    fn ep_place_rows(
        rows: FloatTensor<Self>,
        slots: IntTensor<Self>,
        out_rows: usize,
        unfilled: &[u32],
    ) -> FloatTensor<Self> {
        let out = B::ep_place_rows(rows.primitive.clone(), slots.clone(), out_rows, unfilled);
        match PlaceRowsBackward
            .prepare::<C>([rows.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((slots, unfilled.to_vec()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn ep_take_rows(
        source: FloatTensor<Self>,
        slots: IntTensor<Self>,
        unfilled: &[u32],
    ) -> FloatTensor<Self> {
        let out = B::ep_take_rows(source.primitive.clone(), slots.clone(), unfilled);
        let source_rows = source.shape()[0];
        let unfilled = unfilled.to_vec();
        match TakeRowsBackward
            .prepare::<C>([source.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((slots, source_rows, unfilled), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn ep_topk_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        B::ep_topk_indices(Self::inner(scores), k)
    }

    fn ep_router(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        k: usize,
        scoring: RouterScoring,
    ) -> (IntTensor<Self>, FloatTensor<Self>) {
        // The bias steers the choice only: no gradient reaches it.
        let (idx, weights) = B::ep_router(logits.primitive.clone(), Self::inner(bias), k, scoring);
        let weights = match RouterBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((logits.primitive, idx.clone(), scoring), weights)
            }
            OpsKind::UnTracked(prep) => prep.finish(weights),
        };
        (idx, weights)
    }

    fn ep_router_grad(
        logits: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        grad: FloatTensor<Self>,
        scoring: RouterScoring,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::ep_router_grad(
            Self::inner(logits),
            topk_idx,
            Self::inner(grad),
            scoring,
        ))
    }

    fn ep_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = B::ep_swiglu(gate.primitive.clone(), up.primitive.clone());
        match SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn ep_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (grad_gate, grad_up) =
            B::ep_swiglu_grad(Self::inner(gate), Self::inner(up), Self::inner(grad));
        (Self::from_inner(grad_gate), Self::from_inner(grad_up))
    }

    fn ep_batched_matmul(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        let out = B::ep_batched_matmul(
            a.primitive.clone(),
            b.primitive.clone(),
            transpose_a,
            transpose_b,
        );
        match BatchedMatmulBackward
            .prepare::<C>([a.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((a.primitive, b.primitive, transpose_a, transpose_b), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn ep_combine_grad(
        grad: FloatTensor<Self>,
        y: Option<FloatTensor<Self>>,
        weights: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
        with_grad_y: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let (grad_y, grad_w) = B::ep_combine_grad(
            Self::inner(grad),
            y.map(Self::inner),
            Self::inner(weights),
            positions,
            padded_rows,
            pads,
            with_grad_y,
        );
        (grad_y.map(Self::from_inner), grad_w.map(Self::from_inner))
    }

    fn ep_zeros_after(parent: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        let out = B::ep_zeros_after(parent.primitive.clone(), shape);
        let state = (
            parent.shape(),
            B::float_device(&parent.primitive),
            parent.dtype(),
        );
        match ZerosAfterBackward
            .prepare::<C>([parent.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

impl<B: ExpertParallelBackend, C: CheckpointStrategy> EpCommunication for Autodiff<B, C> {
    fn ep_exchange(
        tag: ExchangeTag,
        rows: Option<FloatTensor<Self>>,
        cols: usize,
        dtype: DType,
        send_counts: &[usize],
        recv_counts: &[usize],
        device: &Self::Device,
        exchange: &SharedExchange,
    ) -> EpResult<Option<FloatTensor<Self>>> {
        // Not differentiable by itself: the differentiable ops are the routes.
        Ok(B::ep_exchange(
            tag,
            rows.map(Self::inner),
            cols,
            dtype,
            send_counts,
            recv_counts,
            device,
            exchange,
        )?
        .map(Self::from_inner))
    }

    fn ep_exchange_record(
        tag: ExchangeTag,
        sent: Option<RecordRows<Self>>,
        columns: [usize; 2],
        dtypes: [DType; 2],
        send_counts: &[usize],
        recv_counts: &[usize],
        device: &Self::Device,
        exchange: &SharedExchange,
    ) -> EpResult<Option<RecordRows<Self>>> {
        // Not differentiable by itself: the differentiable op is the record route.
        let sent = sent.map(|s| RecordRows {
            rows: Self::inner(s.rows),
            weights: Self::inner(s.weights),
            expert_ids: s.expert_ids,
        });
        Ok(B::ep_exchange_record(
            tag,
            sent,
            columns,
            dtypes,
            send_counts,
            recv_counts,
            device,
            exchange,
        )?
        .map(|r| RecordRows {
            rows: Self::from_inner(r.rows),
            weights: Self::from_inner(r.weights),
            expert_ids: r.expert_ids,
        }))
    }

    fn ep_route_rows(
        x: FloatTensor<Self>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<Option<FloatTensor<Self>>> {
        Ok(B::ep_route_rows(Self::inner(x), plan, exchange, op)?.map(Self::from_inner))
    }

    fn ep_return_rows(
        rows: Option<FloatTensor<Self>>,
        cols: usize,
        dtype: DType,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<FloatTensor<Self>> {
        Ok(Self::from_inner(B::ep_return_rows(
            rows.map(Self::inner),
            cols,
            dtype,
            plan,
            exchange,
            op,
        )?))
    }

    fn ep_dispatch_rows(
        x: FloatTensor<Self>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
    ) -> EpResult<FloatTensor<Self>> {
        let out = B::ep_dispatch_rows(x.primitive.clone(), plan, exchange)?;
        Ok(track_dispatch_rows::<B, C>(&x, out, plan, exchange))
    }

    /// Two tracked operations on one exchange: the rows (a dispatch of `x`) and the
    /// received weights (the weights' route), in that order, as if they had moved
    /// one after the other.
    fn ep_record_route(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        expert_offsets: &[usize],
        plan: &mut Plan<Self>,
        exchange: &SharedExchange,
    ) -> EpResult<RecordedRoute<Self>> {
        let (rows, received) = B::ep_record_route(
            x.primitive.clone(),
            weights.primitive.clone(),
            topk_idx,
            expert_offsets,
            plan,
            exchange,
        )?;
        let rows = track_dispatch_rows::<B, C>(&x, rows, plan, exchange);

        // Every rank records the weights' op, even one that receives nothing, so
        // that every rank's backward takes part in the return exchange.
        let (k, dtype) = (weights.shape()[1], weights.dtype());
        let (received_weights, ids) = received.unzip();
        let received_weights =
            received_weights.unwrap_or_else(|| zeros::<B>([0, k], &plan.device, dtype));
        let anchor = order_anchor(exchange, &weights);
        let state = RouteState::new(plan, exchange, k, dtype);
        let prep = DispatchWeightsBackward
            .prepare::<C>([weights.node.clone(), anchor.node])
            .compute_bound()
            .stateful();
        let received_weights = finish_in_order(prep, state, received_weights, exchange);
        let ids = ids
            .unwrap_or_else(|| Tensor::<B, 2, Int>::empty([0, k], &plan.device).into_primitive());
        Ok((rows, Some((received_weights, ids))))
    }

    fn ep_combine_rows(
        y: FloatTensor<Self>,
        weights: Option<FloatTensor<Self>>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<FloatTensor<Self>> {
        let weights = weights
            .unwrap_or_else(|| Self::from_inner(zeros::<B>([0, 1], &plan.device, y.dtype())));
        let received = weights.shape()[0] > 0;
        let out = B::ep_combine_rows(
            y.primitive.clone(),
            received.then(|| weights.primitive.clone()),
            plan,
            exchange,
            op,
        )?;
        let (y_tracked, w_tracked) = (y.is_tracked(), weights.is_tracked());
        let anchor = order_anchor(exchange, &y);
        let state = CombineState {
            route: RouteState::new(plan, exchange, y.shape()[1], y.dtype()),
            y: w_tracked.then(|| y.primitive.clone()),
            weights: weights.primitive.clone(),
            y_tracked,
        };
        let prep = CombineBackward
            .prepare::<C>([y.node.clone(), weights.node.clone(), anchor.node])
            .compute_bound()
            .stateful();
        Ok(finish_in_order(prep, state, out, exchange))
    }
}

/// `out`, the rows dispatched from `x` along `plan`, as a tracked operation whose
/// backward is an unweighted combine of the gradient.
fn track_dispatch_rows<B: ExpertParallelBackend, C: CheckpointStrategy>(
    x: &FloatTensor<Autodiff<B, C>>,
    out: FloatTensor<B>,
    plan: &Plan<B>,
    exchange: &SharedExchange,
) -> FloatTensor<Autodiff<B, C>> {
    let anchor = order_anchor(exchange, x);
    let state = RouteState::new(plan, exchange, x.shape()[1], x.dtype());
    let prep = DispatchRowsBackward
        .prepare::<C>([x.node.clone(), anchor.node])
        .compute_bound()
        .stateful();
    finish_in_order(prep, state, out, exchange)
}

/// An extra, untracked parent for a new operation's node, one level below the
/// group's latest operation still awaiting its backward pass, so that the new node
/// runs backward before it on every rank (see `crate::order`). Without a pending
/// operation, a depth-0 leaf that changes nothing.
/// (The tensor type is Burn's autodiff tensor, the same for every checkpointing
/// strategy.)
fn order_anchor<B: ExpertParallelBackend>(
    exchange: &SharedExchange,
    like: &FloatTensor<Autodiff<B>>,
) -> FloatTensor<Autodiff<B>> {
    let leaf = <FloatTensor<Autodiff<B>>>::new(like.primitive.clone());
    let Some(latest) = exchange.order().pending() else {
        return leaf;
    };
    let latest = downcast_like(&like.node, latest.as_ref())
        .expect("a group's backward order holds autodiff nodes");
    <FloatTensor<Autodiff<B>>>::from_parents(
        like.primitive.clone(),
        std::slice::from_ref(latest),
        leaf.node.requirement,
        leaf.node.properties.clone(),
    )
}

/// `value` as the type of `_like` (a type Burn does not let other crates name).
fn downcast_like<'a, T: 'static>(_like: &T, value: &'a (dyn Any + Send + Sync)) -> Option<&'a T> {
    value.downcast_ref::<T>()
}

/// Finishes an operation; a tracked one joins the group's backward order.
fn finish_in_order<BO, B, S, C, const N: usize>(
    prep: OpsKind<BO, B, S, C, N>,
    state: S,
    out: FloatTensor<B>,
    exchange: &SharedExchange,
) -> FloatTensor<Autodiff<B, C>>
where
    B: ExpertParallelBackend,
    C: CheckpointStrategy,
    S: Pending + Clone + Send + fmt::Debug + 'static,
    BO: Backward<B, N, State = S>,
{
    match prep {
        OpsKind::Tracked(prep) => {
            let token = state.token().clone();
            let output = prep.finish(state, out);
            exchange.order().record(output.node.clone(), &token);
            output
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Backward states that hold the pending token of their operation.
trait Pending {
    fn token(&self) -> &PendingToken;
}

/// What a backward pass needs to move a gradient along (or back along) a route.
#[derive(Clone)]
struct RouteState<B: ExpertParallelBackend> {
    plan: Plan<B>,
    exchange: SharedExchange,
    /// Columns of the forward input (hidden size, or top-k for weights).
    cols: usize,
    dtype: DType,
    /// Alive until this backward step has run (see `crate::order`).
    pending: PendingToken,
}

impl<B: ExpertParallelBackend> RouteState<B> {
    fn new(plan: &Plan<B>, exchange: &SharedExchange, cols: usize, dtype: DType) -> Self {
        Self {
            plan: plan.clone(),
            exchange: exchange.clone(),
            cols,
            dtype,
            pending: PendingToken::default(),
        }
    }
}

impl<B: ExpertParallelBackend> Pending for RouteState<B> {
    fn token(&self) -> &PendingToken {
        &self.pending
    }
}

impl<B: ExpertParallelBackend> fmt::Debug for RouteState<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteState")
            .field("handle", &self.plan.handle)
            .field("send_counts", &self.plan.send_counts)
            .field("recv_counts", &self.plan.recv_counts)
            .field("cols", &self.cols)
            .finish()
    }
}

#[derive(Clone, Debug)]
struct CombineState<B: ExpertParallelBackend> {
    route: RouteState<B>,
    /// The expert outputs, kept when the weights need a gradient.
    y: Option<FloatTensor<B>>,
    /// The received weights `[R, K]` (possibly `[0, K]`).
    weights: FloatTensor<B>,
    y_tracked: bool,
}

impl<B: ExpertParallelBackend> Pending for CombineState<B> {
    fn token(&self) -> &PendingToken {
        &self.route.pending
    }
}

/// A backward pass cannot return an error: a failed exchange panics, naming the
/// rank, the handle and what went wrong (a mismatch names what differed).
fn backward_failed<B: ExpertParallelBackend>(what: &str, s: &RouteState<B>, error: EpError) -> ! {
    let rank = s.exchange.control().rank();
    panic!(
        "burn-ep: rank {rank}: the backward pass of {what} (handle {}) could not move its \
         gradient: {error}",
        s.plan.handle
    )
}

/// dispatch (x → rows): the gradient is an unweighted combine (expert-major), or
/// returns as it is (rank-major).
#[derive(Debug)]
struct DispatchRowsBackward;

impl<B: ExpertParallelBackend> Backward<B, 2> for DispatchRowsBackward {
    type State = RouteState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent, _anchor] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        // Rank-major plans have no positions, so no weights: the combine returns
        // each received row's gradient as it is.
        let unit = s.plan.positions.as_ref().map(|positions| {
            let positions = Tensor::<B, 2, Int>::from_primitive(positions.clone());
            Tensor::<B, 2>::ones(positions.dims(), (&s.plan.device, s.dtype))
                .into_primitive()
                .tensor()
        });
        let grad_x = B::ep_combine_rows(grad, unit, &s.plan, &s.exchange, ExchangeOp::RowsGrad)
            .unwrap_or_else(|e| backward_failed("dispatch", &s, e));
        if let Some(parent) = parent {
            register!(B, grads, parent, grad_x);
        }
    }
}

/// The weights' route (topk_weights → received weights): the gradient returns.
#[derive(Debug)]
struct DispatchWeightsBackward;

impl<B: ExpertParallelBackend> Backward<B, 2> for DispatchWeightsBackward {
    type State = RouteState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent, _anchor] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let received = s.plan.received_rows() > 0;
        let grad_w = B::ep_return_rows(
            received.then_some(grad),
            s.cols,
            s.dtype,
            &s.plan,
            &s.exchange,
            ExchangeOp::WeightsGrad,
        )
        .unwrap_or_else(|e| backward_failed("the weights' dispatch", &s, e));
        if let Some(parent) = parent {
            register!(B, grads, parent, grad_w);
        }
    }
}

/// combine (expert outputs, received weights → tokens): the gradient is routed
/// like a dispatch, then the weighted reduce's adjoint runs locally.
#[derive(Debug)]
struct CombineBackward;

impl<B: ExpertParallelBackend> Backward<B, 3> for CombineBackward {
    type State = CombineState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [y_parent, w_parent, _anchor] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let CombineState {
            route: s,
            y,
            weights,
            y_tracked,
        } = ops.state;
        let received = B::ep_route_rows(grad, &s.plan, &s.exchange, ExchangeOp::CombineGrad)
            .unwrap_or_else(|e| backward_failed("combine", &s, e));
        let [rows, k] = weights.shape().dims();
        let p = s.plan.padded_rows;
        let (grad_y, grad_w) = match (received, &s.plan.positions) {
            // Rank-major: each received row's gradient is its output's; no weights.
            (received, _) if s.plan.rank_major() => (received, None),
            (Some(received), Some(positions)) => B::ep_combine_grad(
                received,
                y,
                weights.clone(),
                positions.clone(),
                p,
                &s.plan.pads,
                y_tracked,
            ),
            _ => (None, None),
        };
        if let Some(parent) = y_parent {
            let grad_y = grad_y.unwrap_or_else(|| zeros::<B>([p, s.cols], &s.plan.device, s.dtype));
            register!(B, grads, parent, grad_y);
        }
        if let Some(parent) = w_parent {
            let grad_w =
                grad_w.unwrap_or_else(|| zeros::<B>([rows, k], &s.plan.device, weights.dtype()));
            register!(B, grads, parent, grad_w);
        }
    }
}

/// `ep_place_rows`: each row's gradient is taken back from its slot.
#[derive(Debug)]
struct PlaceRowsBackward;

impl<B: ExpertParallelBackend> Backward<B, 1> for PlaceRowsBackward {
    type State = (IntTensor<B>, Vec<u32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (slots, unfilled) = ops.state;
        if let Some(parent) = parent {
            register!(B, grads, parent, B::ep_take_rows(grad, slots, &unfilled));
        }
    }
}

/// `ep_take_rows`: each slot's gradient is placed back at its source row; the
/// source rows no slot names get zero.
#[derive(Debug)]
struct TakeRowsBackward;

impl<B: ExpertParallelBackend> Backward<B, 1> for TakeRowsBackward {
    type State = (IntTensor<B>, usize, Vec<u32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (slots, source_rows, unfilled) = ops.state;
        if let Some(parent) = parent {
            let grad = B::ep_place_rows(grad, slots, source_rows, &unfilled);
            register!(B, grads, parent, grad);
        }
    }
}

/// `ep_batched_matmul`, `out = op(a) op(b)`: `op(a)`'s gradient is `grad op(b)ᵀ`
/// and `op(b)`'s is `op(a)ᵀ grad`; an operand read transposed gets the transpose of
/// its op's gradient. Each is one more batched product, reading the saved operands
/// as they are stored.
#[derive(Debug)]
struct BatchedMatmulBackward;

impl<B: ExpertParallelBackend> Backward<B, 2> for BatchedMatmulBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, bool, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [a_parent, b_parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (a, b, transpose_a, transpose_b) = ops.state;
        if let Some(parent) = a_parent {
            let grad_a = match transpose_a {
                false => B::ep_batched_matmul(grad.clone(), b.clone(), false, !transpose_b),
                true => B::ep_batched_matmul(b, grad.clone(), transpose_b, true),
            };
            register!(B, grads, parent, grad_a);
        }
        if let Some(parent) = b_parent {
            let grad_b = match transpose_b {
                false => B::ep_batched_matmul(a, grad, !transpose_a, false),
                true => B::ep_batched_matmul(grad, a, true, transpose_a),
            };
            register!(B, grads, parent, grad_b);
        }
    }
}

/// `ep_swiglu`: both gradients from one pass over the saved inputs.
#[derive(Debug)]
struct SwigluBackward;

impl<B: ExpertParallelBackend> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [gate_parent, up_parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (grad_gate, grad_up) = B::ep_swiglu_grad(gate, up, grad);
        if let Some(parent) = gate_parent {
            register!(B, grads, parent, grad_gate);
        }
        if let Some(parent) = up_parent {
            register!(B, grads, parent, grad_up);
        }
    }
}

/// `ep_router`: the logits' gradient from the weights', for the saved choice.
#[derive(Debug)]
struct RouterBackward;

impl<B: ExpertParallelBackend> Backward<B, 1> for RouterBackward {
    type State = (FloatTensor<B>, IntTensor<B>, RouterScoring);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits, idx, scoring) = ops.state;
        if let Some(parent) = parent {
            register!(
                B,
                grads,
                parent,
                B::ep_router_grad(logits, idx, grad, scoring)
            );
        }
    }
}

/// The zeros of `ep_zeros_after`: the parent's gradient is zero.
#[derive(Debug)]
struct ZerosAfterBackward;

impl<B: ExpertParallelBackend> Backward<B, 1> for ZerosAfterBackward {
    type State = (Shape, B::Device, DType);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        grads.consume::<B>(&ops.node);
        let (shape, device, dtype) = ops.state;
        if let Some(parent) = parent {
            register!(B, grads, parent, zeros_of::<B>(shape, &device, dtype));
        }
    }
}

fn register_on<B: ExpertParallelBackend>(
    grads: &mut Gradients,
    probe: FloatTensor<Autodiff<B>>,
    grad: FloatTensor<B>,
) {
    if grad.shape().num_elements() == 0 && grads.get::<B>(&probe).is_some() {
        return;
    }
    grads.register::<B>(probe.node.id, grad);
}

fn zeros<B: ExpertParallelBackend>(
    shape: [usize; 2],
    device: &B::Device,
    dtype: DType,
) -> FloatTensor<B> {
    crate::backend::zeros::<B>(shape, device, dtype)
}
