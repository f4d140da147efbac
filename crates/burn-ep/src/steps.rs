//! What a backend implements: the types the steps of [`ExpertParallelBackend`]
//! take and return, the exchange they move rows through among them, and the
//! runtimes the CubeCL backends run on ([`EpRuntime`]). A program need not name any
//! of them; a backend in another crate implementing the trait does.
//!
//! [`ExpertParallelBackend`]: crate::ExpertParallelBackend

pub use crate::backend::{
    LayoutOutput, PackMeta, Plan, RecordRows, RecordedRoute, RoutePlan, RouterScoring,
};
pub use crate::exchange::{ExchangeOp, ExchangeTag, RowExchange, SharedExchange};
pub use crate::runtime::{CudaBuffer, EpRuntime};
