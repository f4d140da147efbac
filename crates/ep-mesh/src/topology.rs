//! Which path rows take between two ranks: device copies between the ranks one
//! process drives (peer copies over NVLink, or a copy on the device they share),
//! NCCL to everyone else. Chosen from where the ranks run, and overridable (burn-ep's
//! `RunOptions::intranode`), since a user may know better (e.g. to compare the two).

use std::fmt;
use std::str::FromStr;

use ep_core::{EpError, EpResult};

/// How ranks driven by one process reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IntraProcess {
    /// Device copies where every pair of the process's devices has peer access,
    /// NCCL otherwise.
    #[default]
    Auto,
    /// Device copies, and an error where peer access is missing.
    CudaPeer,
    /// NCCL between every pair of ranks.
    Nccl,
}

impl FromStr for IntraProcess {
    type Err = EpError;

    fn from_str(s: &str) -> EpResult<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cuda-peer" => Ok(Self::CudaPeer),
            "nccl" => Ok(Self::Nccl),
            other => Err(EpError::InvalidConfig(format!(
                "intra-process route {other:?}: expected auto, cuda-peer or nccl"
            ))),
        }
    }
}

impl fmt::Display for IntraProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::CudaPeer => "cuda-peer",
            Self::Nccl => "nccl",
        })
    }
}

/// Where the ranks of a group run: the process and the CUDA ordinal of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub process_of: Vec<usize>,
    pub device_of: Vec<usize>,
}

impl Placement {
    /// `processes` processes driving `local_ranks` consecutive ranks each, on the
    /// devices `first_device ..` of their node.
    pub fn uniform(processes: usize, local_ranks: usize, first_device: usize) -> Self {
        let world = processes * local_ranks;
        Self {
            process_of: (0..world).map(|r| r / local_ranks).collect(),
            device_of: (0..world).map(|r| first_device + r % local_ranks).collect(),
        }
    }

    pub fn world_size(&self) -> usize {
        self.process_of.len()
    }
}

/// The paths of one rank: the ranks it reaches by device copies (its peer group,
/// itself included, in rank order) and the ranks it reaches over NCCL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    pub peers: Vec<usize>,
    pub nccl: Vec<usize>,
}

impl Routes {
    /// Whether the rank needs an NCCL communicator at all.
    pub fn needs_nccl(&self) -> bool {
        !self.nccl.is_empty()
    }
}

/// The routes of `rank`. The choice is made per process, so every rank of a peer
/// group finds the same group. `peer_access(a, b)` says whether device `a` can
/// reach device `b`'s memory.
///
/// Errors: a forced cuda-peer choice where two devices of the process lack peer
/// access ([`EpError::NoPeerAccess`]), and NCCL between two ranks of one process
/// that share a GPU (NCCL refuses two ranks on one device).
pub fn choose_routes(
    placement: &Placement,
    rank: usize,
    peer_access: impl Fn(usize, usize) -> bool,
    choice: IntraProcess,
) -> EpResult<Routes> {
    let process = placement.process_of[rank];
    let same_process: Vec<usize> = (0..placement.world_size())
        .filter(|&r| placement.process_of[r] == process)
        .collect();
    let mut devices: Vec<usize> = same_process
        .iter()
        .map(|&r| placement.device_of[r])
        .collect();
    devices.sort_unstable();
    devices.dedup();
    let missing = devices.iter().find_map(|&a| {
        devices
            .iter()
            .find(|&&b| a != b && !(peer_access(a, b) && peer_access(b, a)))
            .map(|&b| (a, b))
    });
    let by_copies = match (choice, missing) {
        (IntraProcess::Nccl, _) => false,
        (IntraProcess::CudaPeer, Some((from, to))) => {
            return Err(EpError::NoPeerAccess { from, to });
        }
        (IntraProcess::CudaPeer, None) => true,
        (IntraProcess::Auto, missing) => missing.is_none(),
    };
    let peers = if by_copies {
        same_process
    } else {
        if let Some(&other) = same_process
            .iter()
            .find(|&&r| r != rank && placement.device_of[r] == placement.device_of[rank])
        {
            return Err(EpError::InvalidConfig(format!(
                "ranks {rank} and {other} share CUDA device {} in one process, and NCCL \
                 cannot connect two ranks on one device (intra-process route {choice}); \
                 give each rank its own GPU or let them use device copies",
                placement.device_of[rank]
            )));
        }
        vec![rank]
    };
    let nccl = (0..placement.world_size())
        .filter(|r| !peers.contains(r))
        .collect();
    Ok(Routes { peers, nccl })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(_: usize, _: usize) -> bool {
        true
    }

    #[test]
    fn a_node_process_copies_inside_and_uses_nccl_outside() {
        // Two nodes of four GPUs, one process each.
        let placement = Placement::uniform(2, 4, 0);
        let routes = choose_routes(&placement, 5, all, IntraProcess::Auto).unwrap();
        assert_eq!(routes.peers, vec![4, 5, 6, 7]);
        assert_eq!(routes.nccl, vec![0, 1, 2, 3]);
        assert!(routes.needs_nccl());
    }

    #[test]
    fn one_process_per_gpu_uses_nccl_for_everyone_else() {
        let placement = Placement::uniform(4, 1, 0);
        let routes = choose_routes(&placement, 2, all, IntraProcess::Auto).unwrap();
        assert_eq!(routes.peers, vec![2]);
        assert_eq!(routes.nccl, vec![0, 1, 3]);
    }

    #[test]
    fn a_single_process_needs_no_nccl() {
        let placement = Placement::uniform(1, 4, 0);
        let routes = choose_routes(&placement, 0, all, IntraProcess::Auto).unwrap();
        assert_eq!(routes.peers, vec![0, 1, 2, 3]);
        assert!(!routes.needs_nccl());
    }

    #[test]
    fn missing_peer_access_falls_back_to_nccl_or_is_an_error_when_forced() {
        let placement = Placement::uniform(1, 4, 0);
        let no_2_3 = |a: usize, b: usize| !matches!((a, b), (2, 3) | (3, 2));
        let routes = choose_routes(&placement, 1, no_2_3, IntraProcess::Auto).unwrap();
        assert_eq!(routes.peers, vec![1]);
        assert_eq!(routes.nccl, vec![0, 2, 3]);
        let err = choose_routes(&placement, 1, no_2_3, IntraProcess::CudaPeer).unwrap_err();
        assert_eq!(err, EpError::NoPeerAccess { from: 2, to: 3 });
        // One-way access is no access.
        let one_way = |a: usize, b: usize| (a, b) != (1, 0);
        let err = choose_routes(&placement, 0, one_way, IntraProcess::CudaPeer).unwrap_err();
        assert!(matches!(err, EpError::NoPeerAccess { .. }));
    }

    #[test]
    fn nccl_can_be_forced_inside_a_process() {
        let placement = Placement::uniform(2, 2, 0);
        let routes = choose_routes(&placement, 0, all, IntraProcess::Nccl).unwrap();
        assert_eq!(routes.peers, vec![0]);
        assert_eq!(routes.nccl, vec![1, 2, 3]);
    }

    #[test]
    fn ranks_sharing_a_gpu_use_copies_and_never_nccl() {
        // Four ranks on two GPUs in one process.
        let placement = Placement {
            process_of: vec![0; 4],
            device_of: vec![0, 1, 0, 1],
        };
        let routes = choose_routes(&placement, 3, all, IntraProcess::Auto).unwrap();
        assert_eq!(routes.peers, vec![0, 1, 2, 3]);
        let err = choose_routes(&placement, 3, all, IntraProcess::Nccl).unwrap_err();
        assert!(
            err.to_string()
                .contains("ranks 3 and 1 share CUDA device 1"),
            "{err}"
        );
    }

    #[test]
    fn the_override_parses_and_prints() {
        for c in [
            IntraProcess::Auto,
            IntraProcess::CudaPeer,
            IntraProcess::Nccl,
        ] {
            assert_eq!(c.to_string().parse::<IntraProcess>().unwrap(), c);
        }
        assert!("nvlink".parse::<IntraProcess>().is_err());
    }
}
