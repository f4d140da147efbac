//! `EpCompute` and `EpCommunication` for Burn's fusion backends (`Fusion<B>`, what
//! `burn::backend::Wgpu` and `Cuda` are with Burn's default features): each of
//! burn-ep's operations hands its tensors to the inner backend, runs there, and
//! registers what it returns as new fusion tensors.
//!
//! Handing a tensor over drains the fusion stream that made it, so the fused work
//! queued before an operation runs first; Burn's own operations around burn-ep's
//! still fuse with each other (the optimizer's step, norms, activations). The
//! routes are forwarded whole, so the inner backend's own route (a CubeCL
//! backend's, which places a rank's own rows itself) runs; the operations made of
//! those (dispatch and combine rows) reach them through `Self`.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorMetadata};
use burn_fusion::stream::OperationStreams;
use burn_fusion::{get_client, Fusion, FusionBackend, NoOp};
use burn_ir::{InitOperationIr, OperationIr, OperationOutput};
use ep_core::{EpConfig, EpResult};

use crate::backend::{
    EpCommunication, EpCompute, ExpertParallelBackend, LayoutOutput, PackMeta, Packed, Plan,
    RecordRows, RecordedRoute, RouterScoring,
};
use crate::exchange::{ExchangeOp, ExchangeTag, SharedExchange};

fn inner_float<B: FusionBackend>(t: FloatTensor<Fusion<B>>) -> FloatTensor<B> {
    t.client.clone().resolve_tensor_float::<B>(t)
}

fn inner_int<B: FusionBackend>(t: IntTensor<Fusion<B>>) -> IntTensor<B> {
    t.client.clone().resolve_tensor_int::<B>(t)
}

/// Registers an inner tensor as a fusion tensor, as `Fusion::float_from_data` does
/// with the tensor it uploads.
fn outer<B: FusionBackend>(
    shape: burn::tensor::Shape,
    dtype: DType,
    handle: B::Handle,
    device: &B::Device,
) -> FloatTensor<Fusion<B>> {
    let client = get_client::<B>(device);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(
            OperationStreams::default(),
            OperationIr::Init(desc),
            NoOp::<B>::new(),
        )
        .output()
}

fn outer_float<B: FusionBackend>(t: FloatTensor<B>) -> FloatTensor<Fusion<B>> {
    let (shape, dtype, device) = (t.shape(), t.dtype(), B::float_device(&t));
    outer::<B>(shape, dtype, B::float_tensor_handle(t), &device)
}

fn outer_int<B: FusionBackend>(t: IntTensor<B>) -> IntTensor<Fusion<B>> {
    let (shape, dtype, device) = (t.shape(), t.dtype(), B::int_device(&t));
    outer::<B>(shape, dtype, B::int_tensor_handle(t), &device)
}

fn inner_record<B: FusionBackend>(r: RecordRows<Fusion<B>>) -> RecordRows<B> {
    RecordRows {
        rows: inner_float::<B>(r.rows),
        weights: inner_float::<B>(r.weights),
        expert_ids: inner_int::<B>(r.expert_ids),
    }
}

fn outer_record<B: FusionBackend>(r: RecordRows<B>) -> RecordRows<Fusion<B>> {
    RecordRows {
        rows: outer_float::<B>(r.rows),
        weights: outer_float::<B>(r.weights),
        expert_ids: outer_int::<B>(r.expert_ids),
    }
}

impl<B: FusionBackend + ExpertParallelBackend> EpCompute for Fusion<B> {
    fn ep_layout(topk_idx: IntTensor<Self>, config: &EpConfig) -> EpResult<LayoutOutput<Self>> {
        let out = B::ep_layout(inner_int::<B>(topk_idx), config)?;
        Ok(LayoutOutput {
            slots: outer_int::<B>(out.slots),
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
            topk_idx: inner_int::<B>(m.topk_idx),
            experts_per_rank: m.experts_per_rank,
        });
        let (rows, ids) = B::ep_pack(inner_float::<B>(x), inner_int::<B>(slots), sent_rows, meta);
        (outer_float::<B>(rows), ids.map(outer_int::<B>))
    }

    fn ep_expert_positions(
        recv_local: IntTensor<Self>,
        expert_offsets: &[usize],
    ) -> IntTensor<Self> {
        outer_int::<B>(B::ep_expert_positions(
            inner_int::<B>(recv_local),
            expert_offsets,
        ))
    }

    fn ep_expand(
        rows: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
    ) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_expand(
            inner_float::<B>(rows),
            inner_int::<B>(positions),
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
        outer_float::<B>(B::ep_expand_weights(
            inner_float::<B>(weights),
            inner_int::<B>(positions),
            padded_rows,
            pads,
        ))
    }

    fn ep_reduce(
        y: FloatTensor<Self>,
        positions: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_reduce(
            inner_float::<B>(y),
            inner_int::<B>(positions),
            inner_float::<B>(weights),
        ))
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
            inner_float::<B>(grad),
            y.map(inner_float::<B>),
            inner_float::<B>(weights),
            inner_int::<B>(positions),
            padded_rows,
            pads,
            with_grad_y,
        );
        (grad_y.map(outer_float::<B>), grad_w.map(outer_float::<B>))
    }

    fn ep_place_rows(
        rows: FloatTensor<Self>,
        slots: IntTensor<Self>,
        out_rows: usize,
        unfilled: &[u32],
    ) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_place_rows(
            inner_float::<B>(rows),
            inner_int::<B>(slots),
            out_rows,
            unfilled,
        ))
    }

    fn ep_take_rows(
        source: FloatTensor<Self>,
        slots: IntTensor<Self>,
        unfilled: &[u32],
    ) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_take_rows(
            inner_float::<B>(source),
            inner_int::<B>(slots),
            unfilled,
        ))
    }

    fn ep_batched_matmul(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_batched_matmul(
            inner_float::<B>(a),
            inner_float::<B>(b),
            transpose_a,
            transpose_b,
        ))
    }

    fn ep_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_swiglu(inner_float::<B>(gate), inner_float::<B>(up)))
    }

    fn ep_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (grad_gate, grad_up) = B::ep_swiglu_grad(
            inner_float::<B>(gate),
            inner_float::<B>(up),
            inner_float::<B>(grad),
        );
        (outer_float::<B>(grad_gate), outer_float::<B>(grad_up))
    }

    fn ep_topk_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        outer_int::<B>(B::ep_topk_indices(inner_float::<B>(scores), k))
    }

    fn ep_router(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        k: usize,
        scoring: RouterScoring,
    ) -> (IntTensor<Self>, FloatTensor<Self>) {
        let (idx, weights) =
            B::ep_router(inner_float::<B>(logits), inner_float::<B>(bias), k, scoring);
        (outer_int::<B>(idx), outer_float::<B>(weights))
    }

    fn ep_router_grad(
        logits: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        grad: FloatTensor<Self>,
        scoring: RouterScoring,
    ) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_router_grad(
            inner_float::<B>(logits),
            inner_int::<B>(topk_idx),
            inner_float::<B>(grad),
            scoring,
        ))
    }

    fn ep_sum(back: FloatTensor<Self>, slots: IntTensor<Self>) -> FloatTensor<Self> {
        outer_float::<B>(B::ep_sum(inner_float::<B>(back), inner_int::<B>(slots)))
    }
}

impl<B: FusionBackend + ExpertParallelBackend> EpCommunication for Fusion<B> {
    #[allow(clippy::too_many_arguments)]
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
        let received = B::ep_exchange(
            tag,
            rows.map(inner_float::<B>),
            cols,
            dtype,
            send_counts,
            recv_counts,
            device,
            exchange,
        )?;
        Ok(received.map(outer_float::<B>))
    }

    fn ep_record_route(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        expert_offsets: &[usize],
        plan: &mut Plan<Self>,
        exchange: &SharedExchange,
    ) -> EpResult<RecordedRoute<Self>> {
        let mut inner = plan.map_ints(inner_int::<B>);
        let (rows, received) = B::ep_record_route(
            inner_float::<B>(x),
            inner_float::<B>(weights),
            inner_int::<B>(topk_idx),
            expert_offsets,
            &mut inner,
            exchange,
        )?;
        plan.positions = inner.positions.map(outer_int::<B>);
        Ok((
            outer_float::<B>(rows),
            received.map(|(w, ids)| (outer_float::<B>(w), outer_int::<B>(ids))),
        ))
    }

    fn ep_route_rows(
        x: FloatTensor<Self>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<Option<FloatTensor<Self>>> {
        let plan = plan.map_ints(inner_int::<B>);
        let received = B::ep_route_rows(inner_float::<B>(x), &plan, exchange, op)?;
        Ok(received.map(outer_float::<B>))
    }

    fn ep_return_rows(
        rows: Option<FloatTensor<Self>>,
        cols: usize,
        dtype: DType,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<FloatTensor<Self>> {
        let plan = plan.map_ints(inner_int::<B>);
        let rows = rows.map(inner_float::<B>);
        let summed = B::ep_return_rows(rows, cols, dtype, &plan, exchange, op)?;
        Ok(outer_float::<B>(summed))
    }

    #[allow(clippy::too_many_arguments)]
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
        let received = B::ep_exchange_record(
            tag,
            sent.map(inner_record::<B>),
            columns,
            dtypes,
            send_counts,
            recv_counts,
            device,
            exchange,
        )?;
        Ok(received.map(outer_record::<B>))
    }
}
