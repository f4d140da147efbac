//! What a backend implements: the two traits behind [`ExpertParallelBackend`], the
//! compute steps ([`EpCompute`]) and the movement of rows between ranks
//! ([`EpCommunication`]); the types their steps take and return; the exchange that
//! carries rows among them; and the runtimes the CubeCL backends run on
//! ([`EpRuntime`]). A program need not name any of them; a backend in another crate
//! implementing the traits does.
//!
//! [`ExpertParallelBackend`]: crate::ExpertParallelBackend

pub use crate::backend::{
    EpCommunication, EpCompute, LayoutOutput, PackMeta, Plan, RecordRows, RecordedRoute, RoutePlan,
    RouterScoring,
};
pub use crate::exchange::{ExchangeOp, ExchangeTag, RowExchange, SharedExchange};
pub use crate::runtime::{CudaBuffer, EpRuntime};
