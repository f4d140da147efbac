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
    let placement = Placement::new(own, recv.as_deref());
    // Inputs are made contiguous only where rows are sent: CUDA refuses the
    // zero-size copy kernel a rank without tokens would launch.
    let inputs = plan
        .send_slots()
        .map(|slots| [x, slots.clone()].map(into_contiguous));
    let pack = |out: &[CubeTensor<R>], checks| {
        if let Some([x, slots]) = &inputs {
            launch_pack(x, slots, &out[0], None, placement.at(0, None), checks);
        }
    };
    pack_and_send(tag, plan, exchange, own, &planes, recv.as_deref(), pack)?;
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
    // Each token's sum of `back`, the rows that came back (`[S, C]`, send-side
    // order), where this rank sent rows.
    let sum = |back: &CubeTensor<R>, checks| {
        let slots = plan.slots.as_ref().filter(|_| plan.sent_rows() > 0)?;
        let slots = into_contiguous(slots.clone());
        Some(launch_sum(back, &slots, own.zip(rows.as_ref()), checks))
    };
    if let Some(direct) = Direct::of(plan, exchange, own) {
        return direct.pull(tag, &planes, rows.as_ref(), |back| {
            sum(back, BoundsChecks::Off)
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
    Ok(back.and_then(|back| sum(&back[0], BoundsChecks::On)))
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
    let placement = Placement::new(own, recv.as_deref());
    // Inputs are made contiguous only where rows are sent (see `route_rows`).
    let inputs = plan
        .send_slots()
        .map(|slots| [x, weights, topk_idx, slots.clone()].map(into_contiguous));
    // The rows, then the weights with each sent row's destination-local ids, into
    // the planes `out` stands for.
    let pack = |out: &[CubeTensor<R>], checks| {
        if let Some([x, weights, idx, slots]) = &inputs {
            launch_pack(x, slots, &out[0], None, placement.at(0, None), checks);
            let meta = MetaBuffers {
                idx: idx.clone(),
                out_local: out[2].clone(),
                experts_per_rank,
            };
            let ids = placement.at(1, Some(2));
            launch_pack(weights, slots, &out[1], Some(&meta), ids, checks);
        }
    };
    pack_and_send(tag, plan, exchange, own, &planes, recv.as_deref(), pack)?;
    Ok(recv.map(|planes| {
        planes
            .try_into()
            .unwrap_or_else(|_| unreachable!("one receive buffer per plane"))
    }))
}

/// Where a pack puts this rank's own rows: in its receive buffers (one per plane),
/// where the kernels place them.
struct Placement<'a, R: CubeRuntime> {
    own: Option<OwnRows>,
    recv: Option<&'a [CubeTensor<R>]>,
}

impl<'a, R: CubeRuntime> Placement<'a, R> {
    fn new(own: Option<OwnRows>, recv: Option<&'a [CubeTensor<R>]>) -> Self {
        Self { own, recv }
    }

    /// The own rows of plane `rows`, with the expert ids in plane `ids`; `None`
    /// where the transport moves them, or nothing comes.
    fn at(&self, rows: usize, ids: Option<usize>) -> Option<OwnPlacement<'a, R>> {
        let (own, recv) = (self.own?, self.recv?);
        Some(OwnPlacement {
            own,
            rows: &recv[rows],
            ids: ids.map(|i| &recv[i]),
        })
    }
}

/// Packs this rank's rows with `pack` (into the buffers it is given, one per plane
/// of `planes`, with or without bounds checks) and moves them along the route into
/// `recv`: on the direct route the pack writes the peer's rows straight into the
/// peer's buffers; otherwise into send buffers, which the transport moves.
fn pack_and_send<R: EpRuntime>(
    tag: ExchangeTag,
    plan: &CubePlan<R>,
    exchange: &SharedExchange,
    own: Option<OwnRows>,
    planes: &[(usize, DType)],
    recv: Option<&[CubeTensor<R>]>,
    pack: impl Fn(&[CubeTensor<R>], BoundsChecks),
) -> EpResult<()> {
    if let Some(direct) = Direct::of(plan, exchange, own) {
        return direct.push(tag, planes, recv, |out| pack(out, BoundsChecks::Off));
    }
    let send = plan.send_slots().map(|_| {
        let sent = alloc_planes::<R>(&plan.device, planes, plan.sent_rows())
            .unwrap_or_else(|| unreachable!("send slots come with rows to send"));
        pack(&sent, BoundsChecks::On);
        sent
    });
    exchange_into(
        tag,
        send.as_deref(),
        recv,
        planes,
        outgoing(plan, own.is_some()),
        exchange,
    )
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
