//! Starting the ranks of a group inside one process: one thread per rank, each handed
//! its `EpGroup`, with the transport chosen at run time.

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
            other => Err(EpError::InvalidConfig(format!(
                "unknown transport {other:?} (expected local or cuda-peer)"
            ))),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::CudaPeer => "cuda-peer",
        })
    }
}

/// Runs `work` on `config.world_size` ranks, one thread each, and returns each rank's
/// result in rank order. `device(rank, ordinal)` gives a rank its device: `ordinal`
/// is the CUDA device the cuda-peer transport assigned it (0 on the local
/// transport). A rank that panics yields [`EpError::PeerFailed`], and its peers'
/// pending calls fail instead of hanging.
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
        #[cfg(not(feature = "cuda"))]
        Transport::CudaPeer => Err(EpError::InvalidConfig(
            "the cuda-peer transport needs burn-ep's `cuda` feature".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_and_print() {
        for t in [Transport::Local, Transport::CudaPeer] {
            assert_eq!(t.to_string().parse::<Transport>().unwrap(), t);
        }
        assert!(matches!(
            "nccl-ish".parse::<Transport>(),
            Err(EpError::InvalidConfig(_))
        ));
    }
}
