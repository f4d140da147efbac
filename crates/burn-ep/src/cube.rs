//! `EpCompute` and `EpCommunication` for CubeCL backends (wgpu, CUDA): the kernels of
//! `ep-kernels`, launched on the tensors' own client and stream.
//!
//! Buffers the kernels index flatly are allocated with `client.empty` (never
//! pitched) and inputs made contiguous first: CUDA pads the rows of tensors made
//! through the usual paths.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use ep_core::{counters, validate, EpConfig, EpError, EpResult};
use ep_kernels::pack::LocalSegmentLaunch;
use ep_kernels::{combine_grad, expand, layout, pack, reduce, router, slots, sum, swiglu, topk};

use crate::backend::{
    record_layout, record_route_in_steps, return_rows_in_steps, route_rows_in_steps, zeros,
    EpCommunication, EpCompute, LayoutOutput, PackMeta, Packed, Plan, RecordRows, RecordedRoute,
    RouterScoring,
};
use crate::cube_exchange::device_exchange;
use crate::cube_route;
use crate::exchange::{
    host_exchange, host_exchange_record, ExchangeOp, ExchangeTag, SharedExchange,
};
use crate::runtime::EpRuntime;

/// Launches `module::kernel` with bounds checks, or without (`launch_unchecked`)
/// where the launcher says its indices stay in the buffers it binds.
macro_rules! launch_kernel {
    ($checks:expr, $module:ident :: $kernel:ident :: <$r:ty>, $($arg:expr),* $(,)?) => {
        match $checks {
            BoundsChecks::On => $module::$kernel::launch::<$r>($($arg),*),
            // SAFETY: the launcher's indices stay within the memory bound to each
            // argument (see `BoundsChecks::Off`).
            BoundsChecks::Off => unsafe { $module::$kernel::launch_unchecked::<$r>($($arg),*) },
        }
    };
}

/// Whether a launch checks its indices against its arrays' lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BoundsChecks {
    On,
    /// For arguments redirected to a peer's buffer (`EpRuntime::with_redirected`),
    /// whose placeholder is shorter than what the kernel reaches there.
    Off,
}

/// Units per cube for kernels with one unit per element.
const ELEMENT_BLOCK: u32 = 256;
/// Units per cube for kernels with one cube per row.
const ROW_BLOCK: u32 = 128;

impl<R: EpRuntime, F: FloatElement, I: IntElement, BT: BoolElement> EpCompute
    for CubeBackend<R, F, I, BT>
{
    fn ep_layout(topk_idx: IntTensor<Self>, config: &EpConfig) -> EpResult<LayoutOutput<Self>> {
        let topk_idx = into_contiguous(topk_idx);
        let [tokens, top_k] = dims2(&topk_idx);
        let (client, device, int_dtype) = (
            topk_idx.client.clone(),
            topk_idx.device.clone(),
            topk_idx.dtype,
        );
        let world = config.world_size;
        let stats_len = layout::stats_len(world, config.num_experts);
        let stats = client.create_from_slice(&vec![0u8; stats_len * 4]);
        let in_rank = alloc::<R, _>(&client, &device, [tokens, world], DType::U32);
        let slots_out = alloc::<R, _>(&client, &device, [tokens, world], int_dtype);

        counters::kernel_launch();
        layout::layout_kernel::launch::<R>(
            &client,
            elementwise_count(tokens),
            CubeDim::new_1d(ELEMENT_BLOCK),
            topk_idx.clone().into_array_arg(),
            in_rank.clone().into_array_arg(),
            unsafe { ArrayArg::from_raw_parts(stats.clone(), stats_len) },
            tokens,
            world,
            top_k,
            config.experts_per_rank(),
            config.num_experts,
            int_dtype.into(),
        );
        column_scan::<R>(
            &in_rank,
            &slots_out,
            stats.clone(),
            tokens,
            world,
            [world, 1],
        );
        counters::kernel_launch();
        slots::offset_slots_kernel::launch::<R>(
            &client,
            elementwise_count(tokens * world),
            CubeDim::new_1d(ELEMENT_BLOCK),
            slots_out.clone().into_array_arg(),
            unsafe { ArrayArg::from_raw_parts(stats.clone(), world) },
            tokens,
            world,
            int_dtype.into(),
        );

        // The one host synchronisation of the layout: the counts. A failed read is
        // the device's failure (an earlier launch refused or faulted).
        let stats = read_u32(&client, stats).map_err(|reason| EpError::DeviceFailed {
            rank: config.rank,
            reason,
        })?;
        if stats[world + config.num_experts] > 0 {
            // Rare path: find and name the bad id on the host.
            let ids = crate::backend::host_ints(crate::backend::int::<Self, 2>(topk_idx));
            validate::check_topk_idx(config, &ids)?;
            return Err(EpError::Transport(
                "layout kernel flagged a bad expert id the host check did not find".into(),
            ));
        }
        Ok(LayoutOutput {
            slots: slots_out,
            send_counts: stats[..world].iter().map(|&c| c as usize).collect(),
            tokens_per_expert: stats[world..world + config.num_experts]
                .iter()
                .map(|&c| c as usize)
                .collect(),
        })
    }

    fn ep_pack(
        x: FloatTensor<Self>,
        slots: IntTensor<Self>,
        sent_rows: usize,
        meta: Option<PackMeta<Self>>,
    ) -> Packed<Self> {
        let (x, slots) = (into_contiguous(x), into_contiguous(slots));
        let [_, hidden] = dims2(&x);
        let out = alloc::<R, _>(&x.client, &x.device, [sent_rows, hidden], x.dtype);
        let meta = meta.map(|m| {
            let idx = into_contiguous(m.topk_idx);
            let top_k = dims2(&idx)[1];
            let out_local = alloc::<R, _>(&x.client, &x.device, [sent_rows, top_k], idx.dtype);
            MetaBuffers {
                idx,
                out_local,
                experts_per_rank: m.experts_per_rank,
            }
        });
        launch_pack::<R>(&x, &slots, &out, meta.as_ref(), None, BoundsChecks::On);
        (out, meta.map(|m| m.out_local))
    }

    fn ep_expert_positions(
        recv_local: IntTensor<Self>,
        expert_offsets: &[usize],
    ) -> IntTensor<Self> {
        let recv_local = into_contiguous(recv_local);
        let [rows, top_k] = dims2(&recv_local);
        let (client, device, int_dtype) = (
            recv_local.client.clone(),
            recv_local.device.clone(),
            recv_local.dtype,
        );
        let local_experts = expert_offsets.len();
        // Column-major `[L, R]`: each expert's column is contiguous for the scan.
        let member = alloc::<R, _>(&client, &device, [local_experts, rows], DType::U32);
        let ranks = alloc::<R, _>(&client, &device, [local_experts, rows], int_dtype);
        counters::kernel_launch();
        layout::membership_kernel::launch::<R>(
            &client,
            elementwise_count(rows * local_experts),
            CubeDim::new_1d(ELEMENT_BLOCK),
            recv_local.clone().into_array_arg(),
            member.clone().into_array_arg(),
            rows,
            top_k,
            local_experts,
            int_dtype.into(),
        );
        let totals = client.empty(local_experts * 4);
        column_scan::<R>(&member, &ranks, totals, rows, local_experts, [1, rows]);
        let offsets: Vec<u32> = expert_offsets.iter().map(|&o| o as u32).collect();
        let offsets = client.create_from_slice(u32_bytes(&offsets));
        let positions = alloc::<R, _>(&client, &device, [rows, top_k], int_dtype);
        counters::kernel_launch();
        slots::positions_kernel::launch::<R>(
            &client,
            elementwise_count(rows * top_k),
            CubeDim::new_1d(ELEMENT_BLOCK),
            recv_local.clone().into_array_arg(),
            ranks.clone().into_array_arg(),
            unsafe { ArrayArg::from_raw_parts(offsets, local_experts) },
            positions.clone().into_array_arg(),
            rows,
            top_k,
            int_dtype.into(),
        );
        positions
    }

    fn ep_expand(
        rows: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
    ) -> FloatTensor<Self> {
        let (rows, positions) = (into_contiguous(rows), into_contiguous(positions));
        let [received, hidden] = dims2(&rows);
        let top_k = dims2(&positions)[1];
        let client = rows.client.clone();
        let out = alloc::<R, _>(&client, &rows.device, [padded_rows, hidden], rows.dtype);
        let n = vector_size::<R>(&client, hidden, rows.dtype);
        counters::kernel_launch();
        expand::expand_kernel::launch::<R>(
            &client,
            row_count(received),
            CubeDim::new_1d(ROW_BLOCK),
            n,
            rows.clone().into_array_arg(),
            positions.clone().into_array_arg(),
            out.clone().into_array_arg(),
            received,
            hidden / n,
            top_k,
            [rows.dtype.into(), positions.dtype.into()],
        );
        zero_pads::<R>(&out, pads, hidden / n, n);
        out
    }

    fn ep_expand_weights(
        weights: FloatTensor<Self>,
        positions: IntTensor<Self>,
        padded_rows: usize,
        pads: &[u32],
    ) -> FloatTensor<Self> {
        let (weights, positions) = (into_contiguous(weights), into_contiguous(positions));
        let [received, top_k] = dims2(&positions);
        let client = weights.client.clone();
        let out = alloc::<R, _>(&client, &weights.device, [padded_rows], weights.dtype);
        counters::kernel_launch();
        expand::expand_weights_kernel::launch::<R>(
            &client,
            elementwise_count(received * top_k),
            CubeDim::new_1d(ELEMENT_BLOCK),
            weights.clone().into_array_arg(),
            positions.clone().into_array_arg(),
            out.clone().into_array_arg(),
            received * top_k,
            [weights.dtype.into(), positions.dtype.into()],
        );
        zero_pads::<R>(&out, pads, 1, 1);
        out
    }

    fn ep_reduce(
        y: FloatTensor<Self>,
        positions: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (y, positions, weights) = (
            into_contiguous(y),
            into_contiguous(positions),
            into_contiguous(weights),
        );
        let [_, hidden] = dims2(&y);
        let [rows, top_k] = dims2(&positions);
        let out = alloc::<R, _>(&y.client, &y.device, [rows, hidden], y.dtype);
        let n = vector_size::<R>(&y.client, hidden, y.dtype);
        counters::kernel_launch();
        reduce::reduce_kernel::launch::<R>(
            &y.client,
            row_count(rows),
            CubeDim::new_1d(ROW_BLOCK),
            n,
            y.clone().into_array_arg(),
            positions.clone().into_array_arg(),
            weights.clone().into_array_arg(),
            out.clone().into_array_arg(),
            rows,
            hidden / n,
            top_k,
            top_k,
            [y.dtype.into(), weights.dtype.into(), positions.dtype.into()],
        );
        out
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
        let (grad, weights, positions) = (
            into_contiguous(grad),
            into_contiguous(weights),
            into_contiguous(positions),
        );
        let y = y.map(into_contiguous);
        let [rows, hidden] = dims2(&grad);
        let top_k = dims2(&positions)[1];
        let client = grad.client.clone();
        let grad_y = with_grad_y
            .then(|| alloc::<R, _>(&client, &grad.device, [padded_rows, hidden], grad.dtype));
        let grad_w = y
            .is_some()
            .then(|| alloc::<R, _>(&client, &grad.device, [rows, top_k], weights.dtype));
        let n = vector_size::<R>(&client, hidden, grad.dtype);
        if rows > 0 && (grad_y.is_some() || grad_w.is_some()) {
            // An output not asked for is never written, nor `y` read: any array of
            // the right type stands in for them.
            counters::kernel_launch();
            combine_grad::combine_grad_kernel::launch::<R>(
                &client,
                row_count(rows),
                CubeDim::new_1d(combine_grad::GRAD_BLOCK as u32),
                n,
                grad.clone().into_array_arg(),
                y.as_ref().unwrap_or(&grad).clone().into_array_arg(),
                weights.clone().into_array_arg(),
                positions.clone().into_array_arg(),
                grad_y.as_ref().unwrap_or(&grad).clone().into_array_arg(),
                grad_w.as_ref().unwrap_or(&weights).clone().into_array_arg(),
                rows,
                hidden / n,
                top_k,
                combine_grad::GRAD_BLOCK,
                grad_y.is_some(),
                grad_w.is_some(),
                [
                    grad.dtype.into(),
                    weights.dtype.into(),
                    positions.dtype.into(),
                ],
            );
        }
        if let Some(out) = &grad_y {
            zero_pads::<R>(out, pads, hidden / n, n);
        }
        (grad_y, grad_w)
    }

    fn ep_place_rows(
        rows: FloatTensor<Self>,
        slots: IntTensor<Self>,
        out_rows: usize,
        unfilled: &[u32],
    ) -> FloatTensor<Self> {
        // An expand with one slot per row: each row stored once, the rest zeroed.
        Self::ep_expand(rows, slots, out_rows, unfilled)
    }

    fn ep_take_rows(
        source: FloatTensor<Self>,
        slots: IntTensor<Self>,
        _unfilled: &[u32],
    ) -> FloatTensor<Self> {
        // A sum over one slot per row is a gather (Burn's `select` takes three
        // times as long on an H100 at [24576, 2048] bf16).
        Self::ep_sum(source, slots)
    }

    fn ep_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (gate, up) = (into_contiguous(gate), into_contiguous(up));
        assert_eq!(
            gate.shape(),
            up.shape(),
            "swiglu: gate and up differ in shape"
        );
        let out = alloc_like(&gate);
        let elements = gate.shape().num_elements();
        if elements > 0 {
            let n = vector_size::<R>(&gate.client, elements, gate.dtype);
            counters::kernel_launch();
            swiglu::swiglu_kernel::launch::<R>(
                &gate.client,
                elementwise_count(elements / n),
                CubeDim::new_1d(ELEMENT_BLOCK),
                n,
                gate.clone().into_array_arg(),
                up.clone().into_array_arg(),
                out.clone().into_array_arg(),
                elements / n,
                gate.dtype.into(),
            );
        }
        out
    }

    fn ep_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [gate, up, grad] = [gate, up, grad].map(into_contiguous);
        assert!(
            gate.shape() == up.shape() && gate.shape() == grad.shape(),
            "swiglu's backward: gate, up and the gradient differ in shape"
        );
        let (grad_gate, grad_up) = (alloc_like(&gate), alloc_like(&gate));
        let elements = gate.shape().num_elements();
        if elements > 0 {
            let n = vector_size::<R>(&gate.client, elements, gate.dtype);
            counters::kernel_launch();
            swiglu::swiglu_grad_kernel::launch::<R>(
                &gate.client,
                elementwise_count(elements / n),
                CubeDim::new_1d(ELEMENT_BLOCK),
                n,
                gate.clone().into_array_arg(),
                up.clone().into_array_arg(),
                grad.clone().into_array_arg(),
                grad_gate.clone().into_array_arg(),
                grad_up.clone().into_array_arg(),
                elements / n,
                gate.dtype.into(),
            );
        }
        (grad_gate, grad_up)
    }

    fn ep_batched_matmul(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        #[cfg(feature = "cuda")]
        if let Some(out) = crate::cublas::batched_matmul(&a, &b, transpose_a, transpose_b) {
            return out;
        }
        crate::backend::burn_batched_matmul::<Self>(a, b, transpose_a, transpose_b)
    }

    fn ep_topk_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        let scores = into_contiguous(scores);
        let [rows, cols] = dims2(&scores);
        let client = scores.client.clone();
        let int_dtype: DType = I::dtype();
        let indices = alloc::<R, _>(&client, &scores.device, [rows, k], int_dtype);
        if rows > 0 {
            counters::kernel_launch();
            topk::topk_kernel::launch::<R>(
                &client,
                elementwise_count(rows),
                CubeDim::new_1d(ELEMENT_BLOCK),
                scores.clone().into_array_arg(),
                indices.clone().into_array_arg(),
                rows,
                cols,
                k,
                [scores.dtype.into(), int_dtype.into()],
            );
        }
        indices
    }

    fn ep_router(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        k: usize,
        scoring: RouterScoring,
    ) -> (IntTensor<Self>, FloatTensor<Self>) {
        let (logits, bias) = (into_contiguous(logits), into_contiguous(bias));
        let [tokens, experts] = dims2(&logits);
        let client = logits.client.clone();
        let indices = alloc::<R, _>(&client, &logits.device, [tokens, k], I::dtype());
        let weights = alloc::<R, _>(&client, &logits.device, [tokens, k], logits.dtype);
        if tokens > 0 {
            counters::kernel_launch();
            router::router_kernel::launch::<R>(
                &client,
                elementwise_count(tokens),
                CubeDim::new_1d(ELEMENT_BLOCK),
                logits.clone().into_array_arg(),
                bias.clone().into_array_arg(),
                indices.clone().into_array_arg(),
                weights.clone().into_array_arg(),
                tokens,
                experts,
                scoring.scale as f32,
                k,
                scoring.sigmoid,
                scoring.renormalize,
                [logits.dtype.into(), I::dtype().into()],
            );
        }
        (indices, weights)
    }

    fn ep_router_grad(
        logits: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        grad: FloatTensor<Self>,
        scoring: RouterScoring,
    ) -> FloatTensor<Self> {
        let [logits, grad] = [logits, grad].map(into_contiguous);
        let topk_idx = into_contiguous(topk_idx);
        let [tokens, experts] = dims2(&logits);
        let k = dims2(&topk_idx)[1];
        let grad_logits = alloc_like(&logits);
        if tokens > 0 {
            counters::kernel_launch();
            router::router_grad_kernel::launch::<R>(
                &logits.client,
                elementwise_count(tokens),
                CubeDim::new_1d(ELEMENT_BLOCK),
                logits.clone().into_array_arg(),
                topk_idx.clone().into_array_arg(),
                grad.clone().into_array_arg(),
                grad_logits.clone().into_array_arg(),
                tokens,
                experts,
                scoring.scale as f32,
                k,
                scoring.sigmoid,
                scoring.renormalize,
                [logits.dtype.into(), topk_idx.dtype.into()],
            );
        }
        grad_logits
    }

    fn ep_sum(back: FloatTensor<Self>, slots: IntTensor<Self>) -> FloatTensor<Self> {
        launch_sum::<R>(
            &into_contiguous(back),
            &into_contiguous(slots),
            None,
            BoundsChecks::On,
        )
    }
}

impl<R: EpRuntime, F: FloatElement, I: IntElement, BT: BoolElement> EpCommunication
    for CubeBackend<R, F, I, BT>
{
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
        if !exchange.has_device_path() {
            return host_exchange::<Self>(
                tag,
                rows,
                dtype,
                send_counts,
                recv_counts,
                device,
                exchange,
            );
        }
        let received = device_exchange::<R>(
            tag,
            rows.map(|r| vec![r]),
            &[(cols, dtype)],
            send_counts,
            recv_counts,
            device,
            exchange,
        )?;
        Ok(received.and_then(|planes| planes.into_iter().next()))
    }

    fn ep_exchange_record(
        tag: ExchangeTag,
        sent: Option<RecordRows<Self>>,
        [hidden, top_k]: [usize; 2],
        dtypes: [DType; 2],
        send_counts: &[usize],
        recv_counts: &[usize],
        device: &Self::Device,
        exchange: &SharedExchange,
    ) -> EpResult<Option<RecordRows<Self>>> {
        if !exchange.has_device_path() {
            return host_exchange_record::<Self>(
                tag,
                sent,
                dtypes,
                send_counts,
                recv_counts,
                device,
                exchange,
            );
        }
        let sent = sent.map(|s| vec![s.rows, s.weights, s.expert_ids]);
        let planes = [(hidden, dtypes[0]), (top_k, dtypes[1]), (top_k, I::dtype())];
        let received = device_exchange::<R>(
            tag,
            sent,
            &planes,
            send_counts,
            recv_counts,
            device,
            exchange,
        )?;
        Ok(received.map(|planes| {
            let [rows, weights, expert_ids] = planes
                .try_into()
                .unwrap_or_else(|_| unreachable!("one receive buffer per plane"));
            RecordRows {
                rows,
                weights,
                expert_ids,
            }
        }))
    }

    fn ep_record_route(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        topk_idx: IntTensor<Self>,
        expert_offsets: &[usize],
        plan: &mut Plan<Self>,
        exchange: &SharedExchange,
    ) -> EpResult<RecordedRoute<Self>> {
        if !exchange.has_device_path() {
            return record_route_in_steps::<Self>(
                x,
                weights,
                topk_idx,
                expert_offsets,
                plan,
                exchange,
            );
        }
        let (hidden, dtype) = (x.shape()[1], x.dtype);
        let received = cube_route::record_exchange(
            x,
            weights,
            topk_idx,
            expert_offsets.len(),
            plan,
            exchange,
        )?;
        let received = received.map(|[rows, weights, expert_ids]| RecordRows {
            rows,
            weights,
            expert_ids,
        });
        Ok(record_layout::<Self>(
            received,
            hidden,
            dtype,
            expert_offsets,
            plan,
        ))
    }

    fn ep_route_rows(
        x: FloatTensor<Self>,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<Option<FloatTensor<Self>>> {
        if !exchange.has_device_path() {
            return route_rows_in_steps::<Self>(x, plan, exchange, op);
        }
        cube_route::route_rows(x, plan, exchange, op)
    }

    fn ep_return_rows(
        rows: Option<FloatTensor<Self>>,
        cols: usize,
        dtype: DType,
        plan: &Plan<Self>,
        exchange: &SharedExchange,
        op: ExchangeOp,
    ) -> EpResult<FloatTensor<Self>> {
        if !exchange.has_device_path() {
            return return_rows_in_steps::<Self>(rows, cols, dtype, plan, exchange, op);
        }
        let summed = cube_route::return_rows(rows, (cols, dtype), plan, exchange, op)?;
        Ok(summed.unwrap_or_else(|| zeros::<Self>([plan.tokens, cols], &plan.device, dtype)))
    }
}

/// One rank's own rows, placed by the kernels straight into its receive buffers
/// so that no transport copies them: its send segment starts at row `from` of the
/// send buffer, its receive segment at row `to` of the receive buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OwnRows {
    pub rank: usize,
    pub from: usize,
    pub to: usize,
}

impl OwnRows {
    fn launch_arg<R: CubeRuntime>(own: Option<Self>, world: usize) -> LocalSegmentLaunch<R> {
        // Rank `world` is no rank: every row goes through the send buffer.
        let own = own.unwrap_or(OwnRows {
            rank: world,
            from: 0,
            to: 0,
        });
        LocalSegmentLaunch::new(own.rank, own.from, own.to)
    }
}

/// Where a pack puts the rows (and, recording, the expert ids) of this rank's own
/// segment: its receive buffers.
pub(crate) struct OwnPlacement<'a, R: CubeRuntime> {
    pub own: OwnRows,
    pub rows: &'a CubeTensor<R>,
    pub ids: Option<&'a CubeTensor<R>>,
}

/// Sum launch: `out [T, H]`, each token the sum of its rows of `back` (contiguous,
/// slots contiguous). With `own`, the rows of that rank's segment are read from
/// `own`'s tensor (the rows it returns, which no transport copied).
pub(crate) fn launch_sum<R: CubeRuntime>(
    back: &CubeTensor<R>,
    slots: &CubeTensor<R>,
    own: Option<(OwnRows, &CubeTensor<R>)>,
    checks: BoundsChecks,
) -> CubeTensor<R> {
    let [_, hidden] = dims2(back);
    let [tokens, world] = dims2(slots);
    let out = alloc::<R, _>(&back.client, &back.device, [tokens, hidden], back.dtype);
    let n = vector_size::<R>(&back.client, hidden, back.dtype);
    let local = own.map_or(back, |(_, rows)| rows);
    counters::kernel_launch();
    launch_kernel!(
        checks,
        sum::sum_kernel::<R>,
        &back.client,
        row_count(tokens),
        CubeDim::new_1d(ROW_BLOCK),
        n,
        back.clone().into_array_arg(),
        slots.clone().into_array_arg(),
        local.clone().into_array_arg(),
        out.clone().into_array_arg(),
        tokens,
        world,
        hidden / n,
        OwnRows::launch_arg(own.map(|(own, _)| own), world),
        [back.dtype.into(), slots.dtype.into()],
    );
    out
}

/// The metadata a recording pack reads and writes.
pub(crate) struct MetaBuffers<R: CubeRuntime> {
    pub idx: CubeTensor<R>,
    pub out_local: CubeTensor<R>,
    pub experts_per_rank: usize,
}

/// Pack launch. `meta` is given when recording; replays pass `None` and the
/// kernel's launch-uniform `record` flag skips the metadata. With `own`, the rows
/// of that rank's segment go to its receive buffers instead of `out`.
pub(crate) fn launch_pack<R: CubeRuntime>(
    x: &CubeTensor<R>,
    slots: &CubeTensor<R>,
    out: &CubeTensor<R>,
    meta: Option<&MetaBuffers<R>>,
    own: Option<OwnPlacement<'_, R>>,
    checks: BoundsChecks,
) {
    let [tokens, hidden] = dims2(x);
    let world = dims2(slots)[1];
    let n = vector_size::<R>(&x.client, hidden, x.dtype);
    // Without metadata, placeholders of the right types that the kernel never touches.
    let (idx, out_local, top_k, experts_per_rank, record) = match meta {
        Some(m) => (
            m.idx.clone(),
            m.out_local.clone(),
            dims2(&m.idx)[1],
            m.experts_per_rank,
            1,
        ),
        None => (slots.clone(), slots.clone(), 0, 1, 0),
    };
    // Without a placement, the send buffers stand in (no row is written there).
    let local_rows = own.as_ref().map_or(out, |o| o.rows).clone();
    let local_ids = own
        .as_ref()
        .and_then(|o| o.ids)
        .unwrap_or(&out_local)
        .clone();
    let dtypes = [x.dtype.into(), idx.dtype.into()];
    counters::kernel_launch();
    launch_kernel!(
        checks,
        pack::pack_kernel::<R>,
        &x.client,
        row_count(tokens),
        CubeDim::new_1d(ROW_BLOCK),
        n,
        x.clone().into_array_arg(),
        slots.clone().into_array_arg(),
        out.clone().into_array_arg(),
        idx.into_array_arg(),
        out_local.into_array_arg(),
        local_rows.into_array_arg(),
        local_ids.into_array_arg(),
        tokens,
        world,
        hidden / n,
        top_k,
        experts_per_rank,
        record,
        OwnRows::launch_arg(own.map(|o| o.own), world),
        dtypes,
    );
}

/// Zeros the expert-major rows that are alignment padding (`pads`), which no slot
/// names; `row_vectors` vectors of `n` per row.
fn zero_pads<R: CubeRuntime>(out: &CubeTensor<R>, pads: &[u32], row_vectors: usize, n: usize) {
    if pads.is_empty() {
        return;
    }
    let client = &out.client;
    let pad_list = client.create_from_slice(u32_bytes(pads));
    counters::kernel_launch();
    expand::zero_rows_kernel::launch::<R>(
        client,
        row_count(pads.len()),
        CubeDim::new_1d(ROW_BLOCK),
        n,
        out.clone().into_array_arg(),
        unsafe { ArrayArg::from_raw_parts(pad_list, pads.len()) },
        pads.len(),
        row_vectors,
        out.dtype.into(),
    );
}

/// Column scan of a `rows × cols` u32 0/1 matrix into `slots` (same layout, int),
/// with the column totals in `totals[..cols]`. `[row_stride, col_stride]` place
/// entry `(r, c)`: `[cols, 1]` for row-major, `[1, rows]` for column-major.
fn column_scan<R: CubeRuntime>(
    flags: &CubeTensor<R>,
    slots_out: &CubeTensor<R>,
    totals: cubecl::server::Handle,
    rows: usize,
    cols: usize,
    [row_stride, col_stride]: [usize; 2],
) {
    let client = &flags.client;
    let use_plane = slots::plane_scan_supported(client);
    counters::kernel_launch();
    slots::column_scan_kernel::launch::<R>(
        client,
        CubeCount::Static(cols as u32, 1, 1),
        CubeDim::new_1d(slots::SCAN_BLOCK as u32),
        flags.clone().into_array_arg(),
        slots_out.clone().into_array_arg(),
        unsafe { ArrayArg::from_raw_parts(totals, cols) },
        rows,
        cols,
        row_stride,
        col_stride,
        slots::SCAN_BLOCK,
        slots::SCAN_ITEMS,
        use_plane,
        slots_out.dtype.into(),
    );
}

/// The widest vector that divides the row and the client loads in one go.
fn vector_size<R: CubeRuntime>(client: &ComputeClient<R>, hidden: usize, dtype: DType) -> usize {
    client
        .io_optimized_vector_sizes(dtype.size())
        .find(|&n| hidden.is_multiple_of(n))
        .unwrap_or(1)
}

fn elementwise_count(n: usize) -> CubeCount {
    row_count(n.div_ceil(ELEMENT_BLOCK as usize))
}

/// A contiguous tensor of `t`'s shape, dtype and device, not initialised.
fn alloc_like<R: CubeRuntime>(t: &CubeTensor<R>) -> CubeTensor<R> {
    alloc_shaped(&t.client, &t.device, t.shape(), t.dtype)
}

/// `n` cubes, spread over two dimensions to stay under per-dimension limits
/// (65535 on wgpu); kernels guard the excess.
fn row_count(n: usize) -> CubeCount {
    let x = n.clamp(1, 65535);
    CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1)
}

pub(crate) fn alloc<R: CubeRuntime, const D: usize>(
    client: &ComputeClient<R>,
    device: &R::Device,
    shape: [usize; D],
    dtype: DType,
) -> CubeTensor<R> {
    alloc_shaped(client, device, Shape::new(shape), dtype)
}

/// A contiguous tensor of `shape`, not initialised.
fn alloc_shaped<R: CubeRuntime>(
    client: &ComputeClient<R>,
    device: &R::Device,
    shape: Shape,
    dtype: DType,
) -> CubeTensor<R> {
    let bytes = shape.num_elements() * dtype.size();
    let handle = client.empty(bytes.max(4));
    CubeTensor::new_contiguous(client.clone(), device.clone(), shape, handle, dtype)
}

fn dims2<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 2] {
    let shape = t.shape();
    [shape[0], if shape.num_dims() > 1 { shape[1] } else { 1 }]
}

fn read_u32<R: CubeRuntime>(
    client: &ComputeClient<R>,
    handle: cubecl::server::Handle,
) -> Result<Vec<u32>, String> {
    counters::host_sync();
    let bytes = client
        .read_one(handle)
        .map_err(|e| format!("reading the layout's counts failed: {e}"))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn u32_bytes(values: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}
