//! The all-to-all-v of row segments, as the ops see it: a send buffer goes out in
//! per-rank segments, the received rows come back in source-rank order. Forward
//! passes and backward passes call it alike, so it lives behind a trait object the
//! backward state can hold.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Tensor, TensorData};
use ep_core::EpResult;
use ep_mesh::{DeviceExchange, LocalComm};

use crate::backend::{float, int, upload};
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

    /// The device path, for transports that move device buffers themselves (the
    /// cuda-peer transport); `None` when rows travel as host data.
    fn device(&self) -> Option<&dyn DeviceExchange> {
        None
    }
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

#[cfg(feature = "cuda")]
impl RowExchange for ep_mesh::CudaPeerComm {
    /// Host data (routing metadata on backends without the device path) goes through
    /// the control channel.
    fn exchange_rows(
        &self,
        rows: Option<TensorData>,
        send_counts: &[usize],
    ) -> EpResult<Option<TensorData>> {
        self.control().exchange_rows(rows, send_counts)
    }

    fn device(&self) -> Option<&dyn DeviceExchange> {
        Some(self)
    }
}

/// Transports across processes move CUDA device memory only: a backend whose rows
/// are host data has no path there, and is told so instead of being served slowly.
#[cfg(feature = "cuda")]
macro_rules! device_only_exchange {
    ($($transport:ty),*) => {$(
        impl RowExchange for $transport {
            fn exchange_rows(
                &self,
                _rows: Option<TensorData>,
                _send_counts: &[usize],
            ) -> EpResult<Option<TensorData>> {
                Err(ep_core::EpError::Transport(
                    "the nccl and hierarchical transports move CUDA device memory, but this \
                     backend's rows are host data (use the Cuda backend, or the local or \
                     cuda-peer transport)"
                        .into(),
                ))
            }

            fn device(&self) -> Option<&dyn DeviceExchange> {
                Some(self)
            }
        }
    )*};
}

#[cfg(feature = "cuda")]
device_only_exchange!(ep_mesh::NcclComm, ep_mesh::HierarchicalComm);

/// The host path of a float exchange: read the send buffer, move host data, upload
/// what came.
pub(crate) fn host_exchange<B: Backend>(
    rows: Option<FloatTensor<B>>,
    dtype: DType,
    send_counts: &[usize],
    device: &B::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<FloatTensor<B>>> {
    let data = rows.map(|r| float::<B, 2>(r).into_data());
    Ok(exchange
        .exchange_rows(data, send_counts)?
        .map(|d| upload::<B>(d, device, dtype)))
}

/// The host path of an int exchange.
pub(crate) fn host_exchange_ints<B: Backend>(
    ids: Option<IntTensor<B>>,
    send_counts: &[usize],
    device: &B::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<IntTensor<B>>> {
    let data = ids.map(|r| int::<B, 2>(r).into_data());
    Ok(exchange
        .exchange_rows(data, send_counts)?
        .map(|d| Tensor::<B, 2, Int>::from_data(d, device).into_primitive()))
}

/// A shareable exchange, as held by routing handles and backward passes.
pub type SharedExchange = Arc<dyn RowExchange>;
