//! The device path of the exchange on CubeCL backends: the send buffer and a fresh
//! receive buffer are handed to the transport as device pointers, so rows never
//! leave the GPU. Only CUDA buffers have pointers a CUDA transport can use; any
//! other runtime gets an error naming the mismatch.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use ep_core::{counters, EpError, EpResult};
use ep_mesh::Plane;

use crate::cube::alloc;
use crate::exchange::{ExchangeTag, SharedExchange};

/// Moves the planes of `send` (each `[S, cols]`, segments in rank order) through
/// `exchange` in one exchange; returns the received planes (`[R, cols]` each, of
/// the `planes`' columns and dtypes), `None` when nothing came.
pub(crate) fn device_exchange<R: CubeRuntime>(
    tag: ExchangeTag,
    send: Option<Vec<CubeTensor<R>>>,
    planes: &[(usize, DType)],
    send_counts: &[usize],
    recv_counts: &[usize],
    device: &R::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<Vec<CubeTensor<R>>>> {
    let client = R::client(device);
    let send: Option<Vec<_>> = send.map(|planes| planes.into_iter().map(into_contiguous).collect());
    let received: usize = recv_counts.iter().sum();
    let recv: Option<Vec<_>> = (received > 0).then(|| {
        planes
            .iter()
            .map(|&(cols, dtype)| alloc::<R, 2>(&client, device, [received, cols], dtype))
            .collect()
    });
    // The packs that wrote the send buffers and the allocation of the receive
    // buffers are queued on this thread's stream; the copies run on the transport's
    // streams.
    counters::host_sync();
    cubecl::future::block_on(client.sync()).map_err(|e| {
        exchange.device_failed(format_args!(
            "synchronising before the exchange failed: {e}"
        ))
    })?;
    let address = |buffers: &Option<Vec<CubeTensor<R>>>, i: usize| -> EpResult<u64> {
        buffers
            .as_ref()
            .map(|b| device_ptr(&b[i]))
            .transpose()
            .map(|a| a.unwrap_or(0))
    };
    let device_planes = planes
        .iter()
        .enumerate()
        .map(|(i, &(cols, dtype))| {
            Ok(Plane {
                send: address(&send, i)?,
                recv: address(&recv, i)?,
                row_bytes: cols * dtype.size(),
            })
        })
        .collect::<EpResult<Vec<_>>>()?;
    exchange.device_all_to_all(tag, &device_planes, send_counts, recv_counts)?;
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
