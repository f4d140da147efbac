//! The routing handle: what a recording dispatch learned, kept so that cached
//! dispatch, combine and the backward passes replay it instead of recomputing it.

use burn::tensor::{DType, Tensor};
use ep_core::{EpError, EpResult};

use crate::backend::{DispatchLayout, ExpertParallelBackend, Plan};

/// The layout of one dispatch, for one rank. One group serves many layers, each
/// with its own handle.
#[derive(Debug, Clone)]
pub struct Routing<B: ExpertParallelBackend> {
    /// Tokens the caller passed (before sequence-parallel padding).
    pub(crate) tokens: usize,
    pub(crate) hidden: usize,
    pub(crate) world_size: usize,
    pub(crate) dtype: DType,
    pub(crate) tokens_per_expert: Vec<usize>,
    pub(crate) expert_counts: Vec<usize>,
    pub(crate) expert_offsets: Vec<usize>,
    /// What moving a payload along the route needs (counts, slots, positions).
    pub(crate) plan: Plan<B>,
    /// `[received, K]` the top-k weights as received (tracked on autodiff backends).
    pub(crate) recv_weights: Option<Tensor<B, 2>>,
    /// `[padded rows]` the weight of every expert-major row (zero on pad rows).
    pub(crate) row_weights: Tensor<B, 1>,
}

impl<B: ExpertParallelBackend> Routing<B> {
    /// Tokens per rank this handle was recorded for (as passed by the caller).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Hidden size `H` of the rows this handle moves.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The device side of the route (counts, slots, positions), for callers that run
    /// the steps themselves (the benchmark's breakdown). Machinery, not API.
    #[doc(hidden)]
    pub fn plan(&self) -> &Plan<B> {
        &self.plan
    }

    /// Tokens sent to each rank (one copy per rank, however many of its experts).
    pub fn send_counts(&self) -> &[usize] {
        &self.plan.send_counts
    }

    /// Rows received from each rank.
    pub fn recv_counts(&self) -> &[usize] {
        &self.plan.recv_counts
    }

    /// Rows per local expert, before alignment padding.
    pub fn expert_counts(&self) -> &[usize] {
        &self.expert_counts
    }

    /// Start of each local expert's padded group in the expert-major rows; the last
    /// entry is the total number of rows.
    pub fn expert_offsets(&self) -> &[usize] {
        &self.expert_offsets
    }

    /// Expert-major rows, alignment padding included.
    pub fn padded_rows(&self) -> usize {
        *self.expert_offsets.last().unwrap_or(&0)
    }

    /// Rows received in all (one per (source rank, token) that reached this rank).
    pub fn received_rows(&self) -> usize {
        self.plan.received_rows()
    }

    /// Rows sent in all.
    pub fn sent_rows(&self) -> usize {
        self.plan.sent_rows()
    }

    /// (token, expert) pairs this rank sent to each global expert.
    pub fn tokens_per_expert(&self) -> &[usize] {
        &self.tokens_per_expert
    }

    /// The layout the handle's dispatch returned, and its combine takes.
    pub fn layout(&self) -> DispatchLayout {
        self.plan.layout
    }

    /// The top-k weight of every expert-major row (zero on pad rows). Empty for a
    /// rank-major handle, whose rows have one weight per slot (see
    /// [`crate::RankMajorDispatched::weights`]).
    pub fn weights(&self) -> Tensor<B, 1> {
        self.row_weights.clone()
    }

    /// Checks that a payload of `shape` on `device` may replay this handle.
    pub(crate) fn check_payload(
        &self,
        what: &str,
        rows: usize,
        shape: [usize; 2],
        dtype: DType,
        device: &B::Device,
    ) -> EpResult<()> {
        let mismatch = |field: &str, handle: String, got: String| {
            Err(EpError::ReplayMismatch {
                what: format!("{what} {field}"),
                handle,
                got,
            })
        };
        if shape[0] != rows {
            return mismatch("row count", rows.to_string(), shape[0].to_string());
        }
        if shape[1] != self.hidden {
            return mismatch("hidden size", self.hidden.to_string(), shape[1].to_string());
        }
        if dtype != self.dtype {
            return mismatch("dtype", format!("{:?}", self.dtype), format!("{dtype:?}"));
        }
        if device != &self.plan.device {
            return mismatch(
                "device",
                format!("{:?}", self.plan.device),
                format!("{device:?}"),
            );
        }
        Ok(())
    }
}
