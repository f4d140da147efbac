//! The routing handle: what a recording dispatch learned, kept so that cached
//! dispatch, combine and the backward passes replay it instead of recomputing it.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use ep_core::layout::{ExpertLayout, SendLayout};
use ep_core::{EpError, EpResult};

/// The layout of one dispatch, for one rank. One group serves many layers, each
/// with its own handle.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// Tokens the caller passed (before sequence-parallel padding).
    pub(crate) tokens: usize,
    /// Tokens after sequence-parallel padding: the rows that were routed.
    pub(crate) padded_tokens: usize,
    pub(crate) hidden: usize,
    pub(crate) world_size: usize,
    pub(crate) dtype: DType,
    pub(crate) device: B::Device,
    pub(crate) send: SendLayout,
    pub(crate) recv_counts: Vec<usize>,
    pub(crate) experts: ExpertLayout,
    /// Per destination rank, the tokens sent there (`None` when none are).
    pub(crate) send_index: Vec<Option<Tensor<B, 1, Int>>>,
    /// For each expert-major row, its received row; pad rows point one past the end.
    pub(crate) expand_index: Tensor<B, 1, Int>,
    /// For the q-th contribution of every received row, its expert-major row; rows
    /// with fewer contributions point one past the end (a zero row).
    pub(crate) reduce_index: Vec<Tensor<B, 1, Int>>,
    /// Per destination rank, for every token, its row in what that rank sends back;
    /// tokens it did not get point one past the end (`None` when none were sent).
    pub(crate) sum_index: Vec<Option<Tensor<B, 1, Int>>>,
    /// The top-k weight of every expert-major row (zero on pad rows).
    pub(crate) weights: Tensor<B, 1>,
}

impl<B: Backend> Routing<B> {
    /// Tokens per rank this handle was recorded for (as passed by the caller).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Tokens sent to each rank (one copy per rank, however many of its experts).
    pub fn send_counts(&self) -> Vec<usize> {
        self.send.send_counts()
    }

    /// Rows received from each rank.
    pub fn recv_counts(&self) -> &[usize] {
        &self.recv_counts
    }

    /// Rows per local expert, before alignment padding.
    pub fn expert_counts(&self) -> &[usize] {
        &self.experts.expert_counts
    }

    /// Start of each local expert's padded group in the expert-major rows; the last
    /// entry is the total number of rows.
    pub fn expert_offsets(&self) -> &[usize] {
        &self.experts.expert_offsets
    }

    /// Expert-major rows, alignment padding included.
    pub fn padded_rows(&self) -> usize {
        self.experts.padded_rows()
    }

    /// Rows received in all (one per (source rank, token) that reached this rank).
    pub fn received_rows(&self) -> usize {
        self.recv_counts.iter().sum()
    }

    /// (token, expert) pairs this rank sent to each global expert.
    pub fn tokens_per_expert(&self) -> &[usize] {
        &self.send.tokens_per_expert
    }

    /// The top-k weight of every expert-major row (zero on pad rows).
    pub fn weights(&self) -> Tensor<B, 1> {
        self.weights.clone()
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
        if device != &self.device {
            return mismatch(
                "device",
                format!("{:?}", self.device),
                format!("{device:?}"),
            );
        }
        Ok(())
    }
}
