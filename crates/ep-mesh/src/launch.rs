//! Multi-process start-up in the torchrun convention. Two ways to launch:
//!
//! - **one process per GPU** (`torchrun --nproc_per_node=G`): `RANK` and `WORLD_SIZE`
//!   count processes, each drives one rank on GPU `LOCAL_RANK`;
//! - **one process per node** (the per-node runner): `NODE_RANK` of `NNODES`, each
//!   process drives `BURN_EP_LOCAL_RANKS` ranks (default: every GPU it sees) as
//!   threads, so the ranks of a node can use peer copies between themselves.
//!
//! Either way `MASTER_ADDR`/`MASTER_PORT` name the rendezvous, which process 0 hosts.
//! Process `p` drives the global ranks `p * L .. (p + 1) * L`, on the devices
//! `LOCAL_RANK * L ..`.

use std::ops::Range;
use std::time::Duration;

use ep_core::{EpError, EpResult};

use crate::rendezvous::RendezvousConfig;

/// This process's share of a multi-process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Processes in the group, and this one's index among them.
    pub processes: usize,
    pub process: usize,
    /// Ranks each process drives (the same in every process).
    pub local_ranks: usize,
    /// CUDA ordinal of this process's first rank; its others follow.
    pub first_device: usize,
    /// Where process 0 hosts the rendezvous, and how long anyone waits.
    pub rendezvous: RendezvousConfig,
}

impl Launch {
    /// From the process environment; `visible_devices` is the default of
    /// `BURN_EP_LOCAL_RANKS` for the per-node runner.
    pub fn from_env(timeout: Duration, visible_devices: usize) -> EpResult<Self> {
        Self::from_vars(|name| std::env::var(name).ok(), timeout, visible_devices)
    }

    /// From any source of variables (the environment, a config file, a test).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        timeout: Duration,
        visible_devices: usize,
    ) -> EpResult<Self> {
        let number = |name: &str| number(name, var(name));
        let required = |name: &str, why: &str| -> EpResult<usize> {
            number(name)?
                .ok_or_else(|| EpError::InvalidConfig(format!("{name} is not set ({why})")))
        };
        // (processes, process, their variables' names, ranks per process, LOCAL_RANK)
        let (processes, process, names, local_ranks, local_rank) = match number("RANK")? {
            Some(rank) => (
                required("WORLD_SIZE", "RANK is set: one process per GPU")?,
                rank,
                ("RANK", "WORLD_SIZE"),
                number("BURN_EP_LOCAL_RANKS")?.unwrap_or(1),
                number("LOCAL_RANK")?.unwrap_or(0),
            ),
            None => {
                let node = required("NODE_RANK", "neither RANK nor NODE_RANK is set")?;
                let default = visible_devices.max(1);
                (
                    required("NNODES", "NODE_RANK is set: one process per node")?,
                    node,
                    ("NODE_RANK", "NNODES"),
                    number("BURN_EP_LOCAL_RANKS")?.unwrap_or(default),
                    0,
                )
            }
        };
        if process >= processes {
            let (index, count) = names;
            return Err(EpError::InvalidConfig(format!(
                "{index} {process} is outside {count} {processes}"
            )));
        }
        if local_ranks == 0 {
            return Err(EpError::InvalidConfig(
                "BURN_EP_LOCAL_RANKS must be at least 1".into(),
            ));
        }
        let host = var("MASTER_ADDR")
            .ok_or_else(|| EpError::InvalidConfig("MASTER_ADDR is not set".into()))?;
        let port = required("MASTER_PORT", "the rendezvous port")?;
        let addr = RendezvousConfig::resolve(&host, port)?;
        Ok(Self {
            processes,
            process,
            local_ranks,
            first_device: local_rank * local_ranks,
            rendezvous: RendezvousConfig {
                addr,
                world_size: processes,
                rank: process,
                timeout,
            },
        })
    }

    /// Ranks in the whole group.
    pub fn world_size(&self) -> usize {
        self.processes * self.local_ranks
    }

    /// The global ranks this process drives.
    pub fn ranks(&self) -> Range<usize> {
        self.process * self.local_ranks..(self.process + 1) * self.local_ranks
    }

    /// The CUDA ordinal of each of this process's ranks, in rank order.
    pub fn devices(&self) -> Vec<usize> {
        (self.first_device..self.first_device + self.local_ranks).collect()
    }

    /// The process that drives `rank`.
    pub fn process_of(&self, rank: usize) -> usize {
        rank / self.local_ranks
    }
}

/// The number a variable holds, if it is set; an error naming it if it is no number.
/// The count a variable `name` holds (`None` when unset); a value that is not a
/// number is refused naming the variable.
pub fn number(name: &str, value: Option<String>) -> EpResult<Option<usize>> {
    value
        .map(|value| {
            value
                .trim()
                .parse()
                .map_err(|_| EpError::InvalidConfig(format!("{name}={value} is not a number")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    const T: Duration = Duration::from_secs(5);
    const MASTER: [(&str, &str); 2] = [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];

    #[test]
    fn one_process_per_gpu() {
        let mut v = MASTER.to_vec();
        v.extend([("WORLD_SIZE", "8"), ("RANK", "5"), ("LOCAL_RANK", "1")]);
        let launch = Launch::from_vars(vars(&v), T, 4).unwrap();
        assert_eq!(launch.world_size(), 8);
        assert_eq!(launch.ranks(), 5..6);
        assert_eq!(launch.devices(), vec![1]);
        assert_eq!(launch.rendezvous.world_size, 8);
        assert_eq!(launch.rendezvous.rank, 5);
        assert_eq!(launch.rendezvous.addr.port(), 29500);
    }

    #[test]
    fn one_process_per_node_drives_every_visible_gpu() {
        let mut v = MASTER.to_vec();
        v.extend([("NNODES", "2"), ("NODE_RANK", "1")]);
        let launch = Launch::from_vars(vars(&v), T, 4).unwrap();
        assert_eq!(launch.world_size(), 8);
        assert_eq!(launch.ranks(), 4..8);
        assert_eq!(launch.devices(), vec![0, 1, 2, 3]);
        assert_eq!(launch.process_of(3), 0);
        assert_eq!(launch.rendezvous.world_size, 2);

        v.push(("BURN_EP_LOCAL_RANKS", "2"));
        let launch = Launch::from_vars(vars(&v), T, 4).unwrap();
        assert_eq!(launch.ranks(), 2..4);
    }

    #[test]
    fn missing_or_bad_variables_are_named() {
        let err = |v: &[(&str, &str)]| Launch::from_vars(vars(v), T, 1).unwrap_err().to_string();
        assert!(err(&MASTER).contains("neither RANK nor NODE_RANK"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_ADDR"));
        let mut v = MASTER.to_vec();
        v.extend([("RANK", "2"), ("WORLD_SIZE", "2")]);
        assert!(err(&v).contains("RANK 2 is outside WORLD_SIZE 2"));
        let mut v = MASTER.to_vec();
        v.extend([("RANK", "x"), ("WORLD_SIZE", "2")]);
        assert!(err(&v).contains("RANK=x"));
        let mut v = MASTER.to_vec();
        v.extend([("NODE_RANK", "0")]);
        assert!(err(&v).contains("NNODES"));
        let mut v = MASTER.to_vec();
        v.extend([("NODE_RANK", "3"), ("NNODES", "1")]);
        let err = err(&v);
        assert!(err.contains("NODE_RANK 3 is outside NNODES 1"), "{err}");
    }
}
