//! The device path of the exchange on CubeCL backends: the send buffer and a fresh
//! receive buffer are handed to the transport as device pointers, so rows never
//! leave the GPU. Only CUDA buffers have pointers a CUDA transport can use; any
//! other runtime gets an error naming the mismatch.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use ep_core::{counters, EpError, EpResult};

use crate::cube::alloc;
use crate::exchange::{ExchangeTag, SharedExchange};

/// Moves `send` (`[S, cols]`, segments in rank order) through `exchange`; returns the
/// received `[R, cols]` rows, `None` when nothing came.
#[allow(clippy::too_many_arguments)]
pub(crate) fn device_exchange<R: CubeRuntime>(
    tag: ExchangeTag,
    send: Option<CubeTensor<R>>,
    cols: usize,
    dtype: DType,
    send_counts: &[usize],
    recv_counts: &[usize],
    device: &R::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<CubeTensor<R>>> {
    let client = R::client(device);
    let send = send.map(into_contiguous);
    let received: usize = recv_counts.iter().sum();
    let recv = (received > 0).then(|| alloc::<R, 2>(&client, device, [received, cols], dtype));
    // The pack that wrote the send buffer and the allocation of the receive buffer
    // are queued on this thread's stream; the copies run on the transport's streams.
    counters::host_sync();
    cubecl::future::block_on(client.sync()).map_err(|e| {
        exchange.device_failed(format_args!(
            "synchronising before the exchange failed: {e}"
        ))
    })?;
    let send_ptr = send.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
    let recv_ptr = recv.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
    exchange.device_all_to_all(
        tag,
        send_ptr,
        send_counts,
        recv_ptr,
        recv_counts,
        cols * dtype.size(),
    )?;
    Ok(recv)
}

/// The device address of a contiguous tensor's first element.
#[cfg(feature = "cuda")]
fn device_ptr<R: CubeRuntime>(tensor: &CubeTensor<R>) -> EpResult<u64> {
    use std::any::Any;
    let tensor = (tensor as &dyn Any)
        .downcast_ref::<CubeTensor<cubecl::cuda::CudaRuntime>>()
        .ok_or_else(not_cuda)?;
    let resource = tensor
        .client
        .get_resource(tensor.handle.clone())
        .map_err(|e| EpError::Transport(format!("no device address for a buffer: {e:?}")))?;
    Ok(resource.resource().ptr)
}

#[cfg(not(feature = "cuda"))]
fn device_ptr<R: CubeRuntime>(_tensor: &CubeTensor<R>) -> EpResult<u64> {
    Err(not_cuda())
}

fn not_cuda() -> EpError {
    EpError::Transport(
        "the transport moves CUDA device memory, but the backend is not CUDA \
         (use the local transport, or build with the `cuda` feature and the Cuda backend)"
            .into(),
    )
}
