//! Starting the ranks of a group: inside one process ([`run_ranks`], one thread per
//! rank, the transport chosen at run time), or across processes and nodes
//! ([`launch`], in the torchrun convention). What they do is set in code
//! ([`Transport`], [`RunOptions`]); the environment is read only where a program
//! asks for it ([`Transport::from_env`], [`RunOptions::from_env`], and `launch`'s
//! torchrun variables).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use ep_core::{EpConfig, EpError, EpResult};
use ep_mesh::{IntraProcess, DEFAULT_TIMEOUT};

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
    /// Nodes simulated inside the process: [`RunOptions::ranks_per_node`] ranks per
    /// node (default half the group) use device copies among themselves and NCCL to
    /// the other nodes, each rank on its own GPU (feature `cuda`).
    Hierarchical,
}

impl Transport {
    /// The transport named by `BURN_EP_TRANSPORT` (`local` when unset), for a
    /// program that lets its environment choose.
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

/// How a group's ranks start and reach each other, beyond which [`Transport`]:
/// everything has a default (`RunOptions::default()`), and a program that wants
/// its environment to decide calls [`RunOptions::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// How long a rank waits for its peers, at the start and in every call, before
    /// failing with the peer named ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Ranks per simulated node of [`Transport::Hierarchical`]; `None` is half the
    /// group.
    pub ranks_per_node: Option<usize>,
    /// How the ranks one process drives reach each other in a hierarchical group
    /// or a [`launch`]ed one: device copies where the GPUs allow (`Auto`), or one
    /// path forced.
    pub intranode: IntraProcess,
    /// NCCL sends and receives a rank's own rows too, instead of burn-ep's kernels
    /// placing them: a diagnostic for a host with one GPU, where an NCCL group has
    /// one rank and would otherwise never call NCCL's send and receive.
    pub nccl_loopback: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            ranks_per_node: None,
            intranode: IntraProcess::Auto,
            nccl_loopback: false,
        }
    }
}

impl RunOptions {
    /// Sets [`RunOptions::timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`RunOptions::ranks_per_node`].
    pub fn with_ranks_per_node(mut self, ranks: usize) -> Self {
        self.ranks_per_node = Some(ranks);
        self
    }

    /// Sets [`RunOptions::intranode`].
    pub fn with_intranode(mut self, intranode: IntraProcess) -> Self {
        self.intranode = intranode;
        self
    }

    /// Sets [`RunOptions::nccl_loopback`].
    pub fn with_nccl_loopback(mut self, on: bool) -> Self {
        self.nccl_loopback = on;
        self
    }

    /// The options the environment names, for a program that lets it decide:
    /// `BURN_EP_LOCAL_RANKS` (ranks per simulated node), `BURN_EP_INTRANODE`
    /// (`auto`, `cuda-peer` or `nccl`) and `BURN_EP_NCCL_LOOPBACK=1`; the rest as
    /// [`RunOptions::default`]. A value that does not parse is an error naming it.
    pub fn from_env() -> EpResult<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> EpResult<Self> {
        let mut options = Self::default();
        let name = "BURN_EP_LOCAL_RANKS";
        if let Some(ranks) = ep_mesh::launch::number(name, var(name))? {
            options = options.with_ranks_per_node(ranks);
        }
        if let Some(route) = var("BURN_EP_INTRANODE") {
            let route = route
                .parse()
                .map_err(|e| EpError::InvalidConfig(format!("BURN_EP_INTRANODE: {e}")))?;
            options = options.with_intranode(route);
        }
        if let Some(on) = var("BURN_EP_NCCL_LOOPBACK") {
            options = options.with_nccl_loopback(on == "1");
        }
        Ok(options)
    }
}

/// Runs `work` on `config.world_size` ranks, one thread each, and returns each rank's
/// result in rank order. `device(rank, index)` gives a rank its device: on the
/// cuda-peer transport, `CudaDevice::new(index)` is the CUDA device the transport
/// placed the rank on, each rank sharing a GPU getting a server of its own there
/// (`index` is the GPU's ordinal for the first rank on it, `ordinal + 256 × n` for
/// the n-th next, which burn-ep's patched `cubecl-cuda` runs on that GPU); on the
/// local transport `index` is 0. A rank that panics yields [`EpError::PeerFailed`], and its peers'
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
/// use burn_ep::{run_ranks, EpConfig, EpGroup, RunOptions, Transport};
///
/// let config = EpConfig::new(4, 8, 2, 16);
/// let options = RunOptions::default().with_timeout(Duration::from_secs(30));
/// let sums = run_ranks(Transport::Local, &options, &config,
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
    options: &RunOptions,
    config: &EpConfig,
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
    let timeout = options.timeout;
    match transport {
        Transport::Local => Ok(ep_mesh::run_local(config.world_size, timeout, |comm| {
            let rank = comm.rank();
            work(EpGroup::new(config.clone(), comm, device(rank, 0))?)
        })),
        #[cfg(feature = "cuda")]
        Transport::CudaPeer => ep_mesh::run_cuda_peer(config.world_size, timeout, |comm| {
            // Ranks sharing a GPU each get a CubeCL server of their own on it.
            let index = cubecl::cuda::CudaDevice::lane(comm.device(), comm.lane()).index;
            let device = device(comm.rank(), index);
            work(EpGroup::cuda_peer(config.clone(), comm, device)?)
        }),
        #[cfg(feature = "cuda")]
        Transport::Nccl => ep_mesh::run_nccl(config.world_size, timeout, |comm| {
            let device = device(comm.rank(), comm.device());
            let comm = comm.with_loopback(options.nccl_loopback);
            work(EpGroup::nccl(config.clone(), comm, device)?)
        }),
        #[cfg(feature = "cuda")]
        Transport::Hierarchical => {
            let world = config.world_size;
            let local = options.ranks_per_node.unwrap_or((world / 2).max(1));
            let choice = options.intranode;
            ep_mesh::hierarchical::run_simulated_nodes(world, local, choice, timeout, |comm| {
                // Rank r drives GPU r in a simulated node layout.
                let device = device(comm.rank(), comm.rank());
                let comm = comm.with_nccl_loopback(options.nccl_loopback);
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
/// ([`RunOptions::intranode`]). `device(rank, ordinal)` gives a rank its device,
/// `ordinal` being the CUDA device it was placed on.
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
/// use burn::backend::cuda::{Cuda, CudaDevice};
/// use burn_ep::{launch, EpConfig, EpGroup, RunOptions};
///
/// let world = std::env::var("WORLD_SIZE").map_or(Ok(1), |w| w.parse()).unwrap();
/// let config = EpConfig::new(world, 8 * world, 2, 1024);
/// let results = launch(&RunOptions::default(), &config,
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
    options: &RunOptions,
    config: &EpConfig,
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
        use ep_mesh::{Launch, Placement};
        let timeout = options.timeout;
        let launch = Launch::from_env(timeout, ep_mesh::cuda_device_count()?)?;
        if config.world_size != launch.world_size() {
            return Err(EpError::InvalidConfig(format!(
                "config.world_size is {} but the launch has {} processes of {} ranks",
                config.world_size, launch.processes, launch.local_ranks
            )));
        }
        let choice = options.intranode;
        let id = ep_mesh::nccl::unique_id_from_rendezvous(&launch.rendezvous)?;
        // Other processes' devices are laid out like this one's; only this
        // process's are used.
        let placement =
            Placement::uniform(launch.processes, launch.local_ranks, launch.first_device);
        ep_mesh::run_process(&id, &placement, launch.process, choice, timeout, |comm| {
            let rank = comm.rank();
            let comm = comm.with_nccl_loopback(options.nccl_loopback);
            work(EpGroup::hierarchical(
                config.clone(),
                comm,
                device(rank, placement.device_of[rank]),
            )?)
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (options, config, device, work);
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

    /// The environment's names give the options they name, the rest keep their
    /// defaults, and a value that does not parse is refused naming its variable.
    #[test]
    fn options_read_from_variables_name_what_is_wrong() {
        let vars = |pairs: Vec<(&'static str, &'static str)>| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            RunOptions::from_vars(vars(vec![])).unwrap(),
            RunOptions::default()
        );
        let set = RunOptions::from_vars(vars(vec![
            ("BURN_EP_LOCAL_RANKS", "3"),
            ("BURN_EP_INTRANODE", "nccl"),
            ("BURN_EP_NCCL_LOOPBACK", "1"),
        ]))
        .unwrap();
        let expected = RunOptions::default()
            .with_ranks_per_node(3)
            .with_intranode(IntraProcess::Nccl)
            .with_nccl_loopback(true);
        assert_eq!(set, expected);
        for (name, value) in [
            ("BURN_EP_LOCAL_RANKS", "two"),
            ("BURN_EP_INTRANODE", "nvlink"),
        ] {
            match RunOptions::from_vars(vars(vec![(name, value)])) {
                Err(EpError::InvalidConfig(message)) => {
                    assert!(message.contains(name), "{message}")
                }
                other => panic!("{name}={value}: {other:?}"),
            }
        }
    }
}
