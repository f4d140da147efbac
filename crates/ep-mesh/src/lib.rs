//! ep-mesh: the mesh of ranks and the transports that move rows between them.
//!
//! - [`Mesh`]: world size, rank, and which ranks share a node.
//! - [`local`]: ranks as threads of one process (the CPU default and test bed).
//! - [`cuda_peer`] (feature `cuda`): ranks as threads driving the GPUs of one node,
//!   rows moving by peer copies.
//! - [`nccl`] (feature `cuda`): one NCCL communicator per rank, across processes and
//!   nodes; [`hierarchical`] joins it with cuda-peer inside a process.
//! - [`Control`]: the host messages of a group (counts, barriers), on every transport.
//! - [`DeviceExchange`]: what a transport that moves device buffers offers burn-ep.
//! - [`rendezvous`] and [`launch`]: multi-process start-up (torchrun convention);
//!   [`topology`]: which ranks use which path.

#[cfg(feature = "cuda")]
pub mod bandwidth;
mod control;
#[cfg(feature = "cuda")]
pub mod cuda_peer;
mod device_exchange;
#[cfg(feature = "cuda")]
pub mod hierarchical;
pub mod launch;
pub mod local;
mod mesh;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod topology;

pub use control::Control;
#[cfg(feature = "cuda")]
pub use cuda_peer::{
    cuda_device_count, cuda_peer_comms, primary_context, run_cuda_peer, CudaPeerComm,
};
pub use device_exchange::{check_pairing, open_call, DeviceExchange, DirectAccess, Pairing, Plane};
#[cfg(feature = "cuda")]
pub use hierarchical::{run_process, HierarchicalComm};
pub use launch::Launch;
pub use local::{local_comms, run_local, LocalComm, DEFAULT_TIMEOUT};
pub use mesh::Mesh;
#[cfg(feature = "cuda")]
pub use nccl::{run_nccl, NcclComm};
pub use topology::{choose_routes, IntraProcess, Placement, Routes};
