//! Starting the ranks of a group: inside one process ([`run_ranks`], one thread per
//! rank, the transport chosen at run time), or across processes and nodes
//! ([`launch`], in the torchrun convention).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use ep_core::{EpConfig, EpError, EpResult};

use crate::backend::ExpertParallelBackend;
use crate::group::EpGroup;

/// The transports of a group whose ranks are threads of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Host copies through an in-process mailbox: any backend, the CPU default.
    Local,
    /// Device-to-device copies between the GPUs of one node (CUDA backend, feature
    /// `cuda`); ranks share devices round-robin when there are more ranks than GPUs.
    CudaPeer,
    /// One NCCL communicator per rank, each rank on its own GPU (feature `cuda`).
    Nccl,
    /// Nodes simulated inside the process: `BURN_EP_LOCAL_RANKS` ranks per node
    /// (default half the group) use device copies among themselves and NCCL to
    /// the other nodes, each rank on its own GPU (feature `cuda`).
    Hierarchical,
}

impl Transport {
    /// The transport named by `BURN_EP_TRANSPORT` (`local` when unset).
    pub fn from_env() -> EpResult<Self> {
        match std::env::var("BURN_EP_TRANSPORT") {
            Ok(name) => name.parse(),
            Err(_) => Ok(Self::Local),
        }
    }
}

impl FromStr for Transport {
    type Err = EpError;

    fn from_str(s: &str) -> EpResult<Self> {
        match s {
            "local" => Ok(Self::Local),
            "cuda-peer" => Ok(Self::CudaPeer),
            "nccl" => Ok(Self::Nccl),
            "hierarchical" => Ok(Self::Hierarchical),
            other => Err(EpError::InvalidConfig(format!(
                "unknown transport {other:?} (expected local, cuda-peer, nccl or hierarchical)"
            ))),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::CudaPeer => "cuda-peer",
            Self::Nccl => "nccl",
            Self::Hierarchical => "hierarchical",
        })
    }
}

/// Runs `work` on `config.world_size` ranks, one thread each, and returns each rank's
/// result in rank order. `device(rank, ordinal)` gives a rank its device: `ordinal`
/// is the CUDA device the cuda-peer transport assigned it (0 on the local
/// transport). A rank that panics yields [`EpError::PeerFailed`], and its peers'
/// pending calls fail instead of hanging.
///
/// # Example
///
/// Four ranks on the CPU, each adding its rank to a sum over the group (see
/// [`EpGroup::dispatch`] for dispatch and combine):
///
/// ```
/// use std::time::Duration;
/// use burn::backend::NdArray;
/// use burn_ep::{run_ranks, EpConfig, EpGroup, Transport};
///
/// let config = EpConfig::new(4, 8, 2, 16);
/// let sums = run_ranks(Transport::Local, &config, Duration::from_secs(30),
///     |_rank, _ordinal| Default::default(),
///     |group: EpGroup<NdArray<f32>>| group.all_reduce_sum(vec![group.rank() as f32]),
/// )?;
/// for sum in sums {
///     assert_eq!(sum?, [6.0]);
/// }
/// # Ok::<(), burn_ep::EpError>(())
/// ```
pub fn run_ranks<B, R, D, F>(
    transport: Transport,
    config: &EpConfig,
    timeout: Duration,
    device: D,
    work: F,
) -> EpResult<Vec<EpResult<R>>>
where
    B: ExpertParallelBackend,
    R: Send,
    D: Fn(usize, usize) -> B::Device + Sync,
    F: Fn(EpGroup<B>) -> EpResult<R> + Sync,
{
    // Before any thread starts: a world of 0 would otherwise run nothing and succeed.
    config.validate()?;
    match transport {
        Transport::Local => Ok(ep_mesh::run_local(config.world_size, timeout, |comm| {
            let rank = comm.rank();
            work(EpGroup::new(config.clone(), comm, device(rank, 0))?)
        })),
        #[cfg(feature = "cuda")]
        Transport::CudaPeer => ep_mesh::run_cuda_peer(config.world_size, timeout, |comm| {
            let device = device(comm.rank(), comm.device());
            work(EpGroup::cuda_peer(config.clone(), comm, device)?)
        }),
        #[cfg(feature = "cuda")]
        Transport::Nccl => ep_mesh::run_nccl(config.world_size, timeout, |comm| {
            let device = device(comm.rank(), comm.device());
            work(EpGroup::nccl(config.clone(), comm, device)?)
        }),
        #[cfg(feature = "cuda")]
        Transport::Hierarchical => {
            let world = config.world_size;
            let local = ep_mesh::Launch::local_ranks_from_env()?.unwrap_or((world / 2).max(1));
            let choice = ep_mesh::IntraProcess::from_env()?;
            ep_mesh::hierarchical::run_simulated_nodes(world, local, choice, timeout, |comm| {
                // Rank r drives GPU r in a simulated node layout.
                let device = device(comm.rank(), comm.rank());
                work(EpGroup::hierarchical(config.clone(), comm, device)?)
            })
        }
        #[cfg(not(feature = "cuda"))]
        other => Err(needs_cuda(other)),
    }
}

#[cfg(not(feature = "cuda"))]
fn needs_cuda(transport: impl fmt::Display) -> EpError {
    EpError::InvalidConfig(format!(
        "the {transport} transport needs burn-ep's `cuda` feature"
    ))
}

/// Runs this process's ranks of a group whose processes were started in the
/// torchrun convention (see `ep_mesh::launch`: one process per GPU with `RANK`, or
/// one per node with `NODE_RANK`), one thread per rank, and returns their results
/// in rank order. Process 0 hosts the rendezvous that hands out the NCCL id; ranks
/// of one process use device copies between themselves and NCCL to the others
/// (`BURN_EP_INTRANODE=auto|cuda-peer|nccl`). `device(rank, ordinal)` gives a rank
/// its device, `ordinal` being the CUDA device it was placed on.
///
/// A process that never arrives fails the rendezvous by name within `timeout`; a
/// peer that dies or goes silent later fails every pending call within `timeout`.
///
/// # Example
///
/// Started once per GPU, e.g. `torchrun --nproc-per-node 8 ./train` (or by hand:
/// `RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 ./train`, and the
/// same with `RANK=1`); needs the `cuda` feature:
///
/// ```no_run
/// # #[cfg(feature = "cuda")] {
/// use std::time::Duration;
/// use burn::backend::cuda::{Cuda, CudaDevice};
/// use burn_ep::{launch, EpConfig, EpGroup};
///
/// let world = std::env::var("WORLD_SIZE").map_or(Ok(1), |w| w.parse()).unwrap();
/// let config = EpConfig::new(world, 8 * world, 2, 1024);
/// let results = launch(&config, Duration::from_secs(60),
///     |_rank, ordinal| CudaDevice::new(ordinal),
///     |group: EpGroup<Cuda>| {
///         // this process's rank(s): build the model, dispatch, combine, train
///         Ok(group.rank())
///     },
/// )?;
/// # }
/// # Ok::<(), burn_ep::EpError>(())
/// ```
pub fn launch<B, R, D, F>(
    config: &EpConfig,
    timeout: Duration,
    device: D,
    work: F,
) -> EpResult<Vec<EpResult<R>>>
where
    B: ExpertParallelBackend,
    R: Send,
    D: Fn(usize, usize) -> B::Device + Sync,
    F: Fn(EpGroup<B>) -> EpResult<R> + Sync,
{
    config.validate()?;
    #[cfg(feature = "cuda")]
    {
        use ep_mesh::{IntraProcess, Launch, Placement};
        let launch = Launch::from_env(timeout, ep_mesh::cuda_device_count()?)?;
        if config.world_size != launch.world_size() {
            return Err(EpError::InvalidConfig(format!(
                "config.world_size is {} but the launch has {} processes of {} ranks",
                config.world_size, launch.processes, launch.local_ranks
            )));
        }
        let choice = IntraProcess::from_env()?;
        let id = ep_mesh::nccl::unique_id_from_rendezvous(&launch.rendezvous)?;
        // Other processes' devices are laid out like this one's; only this
        // process's are used.
        let placement =
            Placement::uniform(launch.processes, launch.local_ranks, launch.first_device);
        ep_mesh::run_process(&id, &placement, launch.process, choice, timeout, |comm| {
            let rank = comm.rank();
            work(EpGroup::hierarchical(
                config.clone(),
                comm,
                device(rank, placement.device_of[rank]),
            )?)
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (config, timeout, device, work);
        Err(EpError::InvalidConfig(
            "a multi-process group moves rows over NCCL, which needs burn-ep's `cuda` feature"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_and_print() {
        for t in [
            Transport::Local,
            Transport::CudaPeer,
            Transport::Nccl,
            Transport::Hierarchical,
        ] {
            assert_eq!(t.to_string().parse::<Transport>().unwrap(), t);
        }
        assert!(matches!(
            "nccl-ish".parse::<Transport>(),
            Err(EpError::InvalidConfig(_))
        ));
    }
}
