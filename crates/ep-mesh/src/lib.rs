//! ep-mesh: the mesh of ranks and the transports that move rows between them.
//!
//! - [`Mesh`]: world size, rank, and which ranks share a node.
//! - [`local`]: ranks as threads of one process (the CPU default and test bed).
//! - [`rendezvous`]: the TCP rendezvous of multi-process start-up (torchrun convention).

pub mod local;
mod mesh;
pub mod rendezvous;

pub use local::{local_comms, run_local, LocalComm, DEFAULT_TIMEOUT};
pub use mesh::Mesh;
