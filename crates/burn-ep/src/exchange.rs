//! The all-to-all-v of row segments, as the ops see it: a send buffer goes out in
//! per-rank segments, the received rows come back in source-rank order. Forward
//! passes and backward passes call it alike, so it lives behind a trait object the
//! backward state can hold.

use std::sync::Arc;

use burn::tensor::TensorData;
use ep_core::EpResult;
use ep_mesh::LocalComm;

use crate::transfer::{concat_rows, split_rows};

/// Moves rows between the ranks of a group.
pub trait RowExchange: Send + Sync {
    /// `rows` is the send buffer, `send_counts[d]` rows for rank `d` in rank order
    /// (`None` when nothing is sent). Returns what the other ranks sent here,
    /// concatenated in source-rank order (`None` when nothing came).
    fn exchange_rows(
        &self,
        rows: Option<TensorData>,
        send_counts: &[usize],
    ) -> EpResult<Option<TensorData>>;
}

/// The local transport moves host copies (see `transfer`).
impl RowExchange for LocalComm {
    fn exchange_rows(
        &self,
        rows: Option<TensorData>,
        send_counts: &[usize],
    ) -> EpResult<Option<TensorData>> {
        let messages = match rows {
            Some(rows) => split_rows(&rows, send_counts),
            None => vec![None; self.world_size()],
        };
        let received = self.all_to_all(messages)?;
        Ok(concat_rows(received.into_iter().flatten().collect()))
    }
}

/// A shareable exchange, as held by routing handles and backward passes.
pub type SharedExchange = Arc<dyn RowExchange>;
