//! The routes of CubeCL backends on a device transport: a rank's own rows never go
//! through the transport. Going out, the pack writes them straight to their place
//! in this rank's receive buffers; coming back, the sum reads them from the rows
//! being returned. The transport copies only the rows between distinct ranks, so
//! with two ranks it moves half the bytes a full all-to-all would. (A transport
//! may ask to move them itself: NCCL's loopback diagnostic.) In a two-rank group on
//! one GPU (cuda-peer) nothing is copied: the kernels reach into the peer's buffers
//! (`cube_direct`).

use std::slice;

use crate::runtime::EpRuntime;
use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::Runtime;
use ep_core::{EpError, EpResult};

use crate::backend::RoutePlan;
use crate::cube::{launch_pack, launch_sum, BoundsChecks, MetaBuffers, OwnPlacement, OwnRows};
use crate::cube_direct::Direct;
use crate::cube_exchange::{alloc_planes, exchange_into, Counts};
use crate::exchange::{ExchangeOp, ExchangeTag, SharedExchange};

/// The route plan of a CubeCL backend.
type CubePlan<R> = RoutePlan<CubeTensor<R>, <R as Runtime>::Device>;

/// `x [T, C]` packed and sent along the route; the received rows `[R, C]` in
/// source-rank order (`None` when nothing came).
pub(crate) fn route_rows<R: EpRuntime>(
    x: CubeTensor<R>,
    plan: &CubePlan<R>,
    exchange: &SharedExchange,
    op: ExchangeOp,
) -> EpResult<Option<CubeTensor<R>>> {
    let tag = ExchangeTag::new(plan.handle, op);
    let own = own_rows(plan, exchange, tag)?;
    let planes = [(x.shape()[1], x.dtype)];
    let recv = alloc_planes::<R>(&plan.device, &planes, plan.received_rows());
    if let Some(direct) = Direct::of(plan, exchange, own) {
        let send = plan
            .send_slots()
            .map(|slots| (into_contiguous(x), into_contiguous(slots.clone())));
        direct.push(tag, &planes, recv.as_deref(), |out, placement| {
            if let Some((x, slots)) = &send {
                let placement = placement.at(0, None);
                launch_pack(x, slots, &out[0], None, placement, BoundsChecks::Off);
            }
        })?;
        return Ok(recv.and_then(|planes| planes.into_iter().next()));
    }
    // Inputs are made contiguous only where rows are sent: CUDA refuses the
    // zero-size copy kernel a rank without tokens would launch.
    let send = plan.send_slots().map(|slots| {
        let sent = alloc_planes::<R>(&plan.device, &planes, plan.sent_rows())
            .unwrap_or_else(|| unreachable!("send slots come with rows to send"));
        let placement = own.zip(recv.as_ref()).map(|(own, recv)| OwnPlacement {
            own,
            rows: &recv[0],
            ids: None,
        });
        let slots = into_contiguous(slots.clone());
        launch_pack(
            &into_contiguous(x),
            &slots,
            &sent[0],
            None,
            placement,
            BoundsChecks::On,
        );
        sent
    });
    exchange_into(
        tag,
        send.as_deref(),
        recv.as_deref(),
        &planes,
        outgoing(plan, own.is_some()),
        exchange,
    )?;
    Ok(recv.and_then(|planes| planes.into_iter().next()))
}

/// Received-side rows `[R, C]` sent back to their sources, where each token sums
/// what came back in rank order: `[T, C]`, or `None` when this rank sent no rows
/// (every token's sum is zero).
pub(crate) fn return_rows<R: EpRuntime>(
    rows: Option<CubeTensor<R>>,
    (cols, dtype): (usize, DType),
    plan: &CubePlan<R>,
    exchange: &SharedExchange,
    op: ExchangeOp,
) -> EpResult<Option<CubeTensor<R>>> {
    let tag = ExchangeTag::new(plan.handle, op);
    let own = own_rows(plan, exchange, tag)?;
    let rows = rows.map(into_contiguous);
    let planes = [(cols, dtype)];
    if let Some(direct) = Direct::of(plan, exchange, own) {
        return direct.pull(tag, &planes, rows.as_ref(), |back| {
            let slots = plan.slots.as_ref().filter(|_| plan.sent_rows() > 0)?;
            let own = own.zip(rows.as_ref());
            let slots = into_contiguous(slots.clone());
            Some(launch_sum(back, &slots, own, BoundsChecks::Off))
        });
    }
    let back = alloc_planes::<R>(&plan.device, &planes, plan.sent_rows());
    let counts = Counts {
        send: &plan.recv_counts,
        recv: &plan.send_counts,
        local_placed: own.is_some(),
    };
    exchange_into(
        tag,
        rows.as_ref().map(slice::from_ref),
        back.as_deref(),
        &planes,
        counts,
        exchange,
    )?;
    Ok(match (&back, &plan.slots) {
        (Some(back), Some(slots)) => Some(launch_sum(
            &back[0],
            &into_contiguous(slots.clone()),
            own.zip(rows.as_ref()),
            BoundsChecks::On,
        )),
        _ => None,
    })
}

/// The exchange of a recording dispatch: `x [T, H]` and `weights [T, K]` packed,
/// the weights' pack writing each sent row's destination-local expert ids from
/// `topk_idx`, all three moved in one exchange. Returns the received rows,
/// weights and ids (`None` when nothing came).
pub(crate) fn record_exchange<R: EpRuntime>(
    x: CubeTensor<R>,
    weights: CubeTensor<R>,
    topk_idx: CubeTensor<R>,
    experts_per_rank: usize,
    plan: &CubePlan<R>,
    exchange: &SharedExchange,
) -> EpResult<Option<[CubeTensor<R>; 3]>> {
    let tag = ExchangeTag::new(plan.handle, ExchangeOp::Record);
    let own = own_rows(plan, exchange, tag)?;
    let top_k = weights.shape()[1];
    let planes = [
        (x.shape()[1], x.dtype),
        (top_k, weights.dtype),
        (top_k, topk_idx.dtype),
    ];
    let recv = alloc_planes::<R>(&plan.device, &planes, plan.received_rows());
    let into_array = |planes: Vec<CubeTensor<R>>| -> [CubeTensor<R>; 3] {
        planes
            .try_into()
            .unwrap_or_else(|_| unreachable!("one receive buffer per plane"))
    };
    if let Some(direct) = Direct::of(plan, exchange, own) {
        // Inputs are made contiguous only where rows are sent (see `route_rows`).
        let send = plan.send_slots().map(|slots| {
            let inputs = [x, weights, topk_idx, slots.clone()];
            inputs.map(into_contiguous)
        });
        direct.push(tag, &planes, recv.as_deref(), |out, placement| {
            if let Some([x, weights, idx, slots]) = &send {
                let rows = placement.at(0, None);
                launch_pack(x, slots, &out[0], None, rows, BoundsChecks::Off);
                let meta = MetaBuffers {
                    idx: idx.clone(),
                    out_local: out[2].clone(),
                    experts_per_rank,
                };
                let weights_placement = placement.at(1, Some(2));
                let (out, checks) = (&out[1], BoundsChecks::Off);
                launch_pack(weights, slots, out, Some(&meta), weights_placement, checks);
            }
        })?;
        return Ok(recv.map(into_array));
    }
    // Inputs are made contiguous only where rows are sent (see `route_rows`).
    let send = plan.send_slots().map(|slots| {
        let (x, weights) = (into_contiguous(x), into_contiguous(weights));
        let slots = into_contiguous(slots.clone());
        let sent = alloc_planes::<R>(&plan.device, &planes, plan.sent_rows())
            .unwrap_or_else(|| unreachable!("send slots come with rows to send"));
        let placement = |rows: usize, ids: Option<usize>| {
            own.zip(recv.as_ref()).map(|(own, recv)| OwnPlacement {
                own,
                rows: &recv[rows],
                ids: ids.map(|i| &recv[i]),
            })
        };
        launch_pack(
            &x,
            &slots,
            &sent[0],
            None,
            placement(0, None),
            BoundsChecks::On,
        );
        let meta = MetaBuffers {
            idx: into_contiguous(topk_idx),
            out_local: sent[2].clone(),
            experts_per_rank,
        };
        launch_pack(
            &weights,
            &slots,
            &sent[1],
            Some(&meta),
            placement(1, Some(2)),
            BoundsChecks::On,
        );
        sent
    });
    exchange_into(
        tag,
        send.as_deref(),
        recv.as_deref(),
        &planes,
        outgoing(plan, own.is_some()),
        exchange,
    )?;
    Ok(recv.map(into_array))
}

/// The counts of a route going out; `local_placed` when the pack placed this
/// rank's own rows.
fn outgoing<R: CubeRuntime>(plan: &CubePlan<R>, local_placed: bool) -> Counts<'_> {
    Counts {
        send: &plan.send_counts,
        recv: &plan.recv_counts,
        local_placed,
    }
}

/// Where this rank's own rows sit in the send-side and the receive-side buffers;
/// `None` where the transport moves them itself. A rank sends itself as many rows
/// as it receives from itself, or the plan is not this rank's: refused before
/// anything is written.
fn own_rows<R: CubeRuntime>(
    plan: &CubePlan<R>,
    exchange: &SharedExchange,
    tag: ExchangeTag,
) -> EpResult<Option<OwnRows>> {
    let rank = exchange.control().rank();
    let (sent, received) = (plan.send_counts.get(rank), plan.recv_counts.get(rank));
    if sent.is_none() || sent != received {
        return Err(EpError::ExchangeMismatch {
            rank,
            peer: rank,
            expected: format!("{tag} with {} rows from itself", received.unwrap_or(&0)),
            got: format!("{} rows to itself", sent.unwrap_or(&0)),
        });
    }
    Ok(exchange.places_own_rows().then(|| OwnRows {
        rank,
        from: plan.send_counts[..rank].iter().sum(),
        to: plan.recv_counts[..rank].iter().sum(),
    }))
}
