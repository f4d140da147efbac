//! The hierarchical mesh: the ranks one process drives (a node's GPUs, in the
//! per-node runner) move rows between themselves by device copies, and reach the
//! ranks of other processes over NCCL; both halves of an all-to-all run at once.
//! Which rank takes which path comes from [`choose_routes`].

use std::time::{Duration, Instant};

use ep_core::{EpError, EpResult};

use crate::control::Control;
use crate::cuda_peer::{can_access_peer, cuda_peer_comms_on, CudaPeerComm};
use crate::device_exchange::{
    check_counts, check_pairing, spans_of_call, DeviceExchange, Pairing, Plane, Span,
};
use crate::local::run_threads;
use crate::nccl::{transfers, NcclComm};
use crate::topology::{choose_routes, IntraProcess, Placement, Routes};

/// One rank's end of a hierarchical group.
pub struct HierarchicalComm {
    rank: usize,
    world_size: usize,
    /// Every rank of the group (the control channel, and rows to other processes);
    /// `None` when the whole group is this process's peer group.
    nccl: Option<NcclComm>,
    /// The ranks reached by device copies (global ranks, in order) and their
    /// transport; `None` when this rank reaches only itself that way.
    peers: Option<(Vec<usize>, CudaPeerComm)>,
}

/// Runs this process's ranks of a group placed by `placement`, one thread each,
/// and returns their results in rank order. `unique_id` names the NCCL
/// communicator every process joins (see `nccl::unique_id_from_rendezvous`); the
/// routes come from [`choose_routes`] with `choice`.
pub fn run_process<R, F>(
    unique_id: &[u8],
    placement: &Placement,
    process: usize,
    choice: IntraProcess,
    timeout: Duration,
    work: F,
) -> EpResult<Vec<EpResult<R>>>
where
    R: Send,
    F: Fn(HierarchicalComm) -> EpResult<R> + Sync,
{
    let world_size = placement.world_size();
    let ranks: Vec<usize> = (0..world_size)
        .filter(|&r| placement.process_of[r] == process)
        .collect();
    let Some(&first) = ranks.first() else {
        return Err(EpError::InvalidConfig(format!(
            "process {process} drives no rank of the placement"
        )));
    };
    let access = |a: usize, b: usize| can_access_peer(a, b).unwrap_or(false);
    let routes: Routes = choose_routes(placement, first, access, choice)?;
    // The choice is per process: either all its ranks copy between themselves, or
    // each is alone. A group that is only this process needs no NCCL, and copies
    // even to itself.
    let peer_comms: Vec<Option<CudaPeerComm>> = if routes.peers.len() > 1 || !routes.needs_nccl() {
        let devices = routes
            .peers
            .iter()
            .map(|&r| placement.device_of[r])
            .collect();
        cuda_peer_comms_on(devices, timeout)?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        ranks.iter().map(|_| None).collect()
    };
    let units: Vec<(usize, Option<CudaPeerComm>)> = ranks.iter().copied().zip(peer_comms).collect();
    Ok(run_threads(
        units,
        |unit| unit.0,
        |unit| unit.1.as_ref().map(|peer| peer.control().departure()),
        |(rank, peer)| {
            let nccl = routes
                .needs_nccl()
                .then(|| {
                    NcclComm::init(
                        unique_id,
                        world_size,
                        rank,
                        placement.device_of[rank],
                        timeout,
                    )
                })
                .transpose()?;
            work(HierarchicalComm {
                rank,
                world_size,
                nccl,
                peers: peer.map(|p| (routes.peers.clone(), p)),
            })
        },
    ))
}

/// Runs a hierarchical group of `world_size` ranks inside this process as if it
/// were `world_size / local_ranks` processes (nodes) of `local_ranks` ranks each:
/// rank `r` on GPU `r`, device copies inside a node, NCCL between nodes. The
/// single-host stand-in for a multi-node launch; results in rank order.
pub fn run_simulated_nodes<R, F>(
    world_size: usize,
    local_ranks: usize,
    choice: IntraProcess,
    timeout: Duration,
    work: F,
) -> EpResult<Vec<EpResult<R>>>
where
    R: Send,
    F: Fn(HierarchicalComm) -> EpResult<R> + Sync,
{
    if local_ranks == 0 || !world_size.is_multiple_of(local_ranks) {
        return Err(EpError::InvalidConfig(format!(
            "{world_size} ranks do not split into nodes of {local_ranks}"
        )));
    }
    let devices = crate::cuda_peer::cuda_device_count()?;
    if world_size > devices {
        return Err(EpError::InvalidConfig(format!(
            "simulated nodes put each rank on its own GPU: {world_size} ranks, \
             this process sees {devices} GPU(s)"
        )));
    }
    let placement = Placement {
        process_of: (0..world_size).map(|r| r / local_ranks).collect(),
        device_of: (0..world_size).collect(),
    };
    let processes = world_size / local_ranks;
    let id = if processes > 1 || choice == IntraProcess::Nccl {
        crate::nccl::nccl_unique_id()?
    } else {
        Vec::new() // one node, device copies only: no communicator to name
    };
    let per_node: Vec<EpResult<Vec<EpResult<R>>>> = std::thread::scope(|scope| {
        let nodes: Vec<_> = (0..processes)
            .map(|node| {
                let (id, placement, work) = (&id, &placement, &work);
                scope.spawn(move || run_process(id, placement, node, choice, timeout, work))
            })
            .collect();
        nodes
            .into_iter()
            .map(|node| {
                node.join()
                    .unwrap_or_else(|_| Err(EpError::Transport("a simulated node panicked".into())))
            })
            .collect()
    });
    let mut results = Vec::with_capacity(world_size);
    for (node, outcome) in per_node.into_iter().enumerate() {
        match outcome {
            Ok(ranks) => results.extend(ranks),
            Err(e) => results.extend((0..local_ranks).map(|_| {
                Err(EpError::Transport(format!(
                    "node {node} did not start: {e}"
                )))
            })),
        }
    }
    Ok(results)
}

impl HierarchicalComm {
    /// This rank's NCCL communicator, where it has one, with
    /// [`NcclComm::with_loopback`].
    pub fn with_nccl_loopback(mut self, on: bool) -> Self {
        self.nccl = self.nccl.take().map(|n| n.with_loopback(on));
        self
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn control(&self) -> &dyn Control {
        match (&self.nccl, &self.peers) {
            (Some(nccl), _) => nccl,
            (None, Some((_, peer))) => peer.control().as_ref(),
            (None, None) => unreachable!("a rank without NCCL has a peer group"),
        }
    }
}

impl Control for HierarchicalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_to_all_bytes(&self, send: Vec<Vec<u8>>, recv_lens: &[usize]) -> EpResult<Vec<Vec<u8>>> {
        self.control().all_to_all_bytes(send, recv_lens)
    }
}

impl DeviceExchange for HierarchicalComm {
    fn all_to_all_v(
        &self,
        planes: &[Plane],
        send_counts: &[usize],
        recv_counts: &[usize],
        local_placed: bool,
        pairing: &dyn Pairing,
        stream: u64,
    ) -> EpResult<()> {
        let Some((members, peer)) = &self.peers else {
            let nccl = self.nccl.as_ref().expect("a rank without peers has NCCL");
            return nccl.all_to_all_v(
                planes,
                send_counts,
                recv_counts,
                local_placed,
                pairing,
                stream,
            );
        };
        check_counts(self.rank, self.world_size, send_counts, recv_counts)?;
        // The whole group pairs up first: the copies inside the node see only its
        // members.
        check_pairing(self, pairing)?;
        let (send, recv) = spans_of_call(planes, send_counts, recv_counts, self.rank, local_placed);
        let pick = |list: &[Vec<Span>]| -> Vec<Vec<Span>> {
            members.iter().map(|&r| list[r].clone()).collect()
        };
        let Some(nccl) = &self.nccl else {
            return peer.exchange_spans(&pick(&send), &pick(&recv), None, stream);
        };
        // NCCL first (it runs on its own), then the copies, then wait for NCCL.
        let outside = |rank: usize| !members.contains(&rank);
        let (sends, recvs) = (transfers(&send, outside), transfers(&recv, outside));
        let deadline = Instant::now() + nccl.timeout();
        nccl.follow(stream)?;
        nccl.start(&sends, &recvs, deadline)?;
        let copied = peer.exchange_spans(&pick(&send), &pick(&recv), None, stream);
        // Wait for NCCL even after a failed copy: its buffers are still in use.
        let received = nccl.finish(&sends, &recvs, deadline);
        copied.and(received)
    }

    /// A rank without peers in its process is NCCL's alone, loopback included.
    fn moves_own_rows(&self) -> bool {
        self.peers.is_none() && self.nccl.as_ref().is_some_and(|n| n.moves_own_rows())
    }
}
