//! ep-mesh: the mesh of ranks and the transports that move rows between them.
//!
//! - [`Mesh`]: world size, rank, and which ranks share a node.
//! - [`local`]: ranks as threads of one process (the CPU default and test bed).
//! - [`cuda_peer`] (feature `cuda`): ranks as threads driving the GPUs of one node,
//!   rows moving by peer copies.
//! - [`DeviceExchange`]: what a transport that moves device buffers offers burn-ep.
//! - [`rendezvous`]: the TCP rendezvous of multi-process start-up (torchrun convention).

#[cfg(feature = "cuda")]
pub mod bandwidth;
#[cfg(feature = "cuda")]
pub mod cuda_peer;
mod device_exchange;
pub mod local;
mod mesh;
pub mod rendezvous;

#[cfg(feature = "cuda")]
pub use cuda_peer::{cuda_device_count, cuda_peer_comms, run_cuda_peer, CudaPeerComm};
pub use device_exchange::DeviceExchange;
pub use local::{local_comms, run_local, LocalComm, DEFAULT_TIMEOUT};
pub use mesh::Mesh;
