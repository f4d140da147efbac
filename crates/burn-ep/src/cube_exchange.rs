//! The device path of the exchange on CubeCL backends: the send buffer and a fresh
//! receive buffer are handed to the transport as device pointers, so rows never
//! leave the GPU. Only CUDA buffers have pointers a CUDA transport can use; any
//! other runtime gets an error naming the mismatch.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use ep_core::{EpError, EpResult};
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
    // The packs that wrote the send buffers are queued on this thread's stream, and
    // the kernels that read the receive buffers will be: the transport orders its
    // copies between them on the device, so the host does not wait here.
    let buffers: Vec<DeviceBuffer> = recv
        .iter()
        .chain(send.iter())
        .flatten()
        .map(device_buffer)
        .collect::<EpResult<_>>()?;
    let stream = one_stream(&buffers)?;
    let mut addresses = buffers.iter().map(|b| b.address);
    let mut take = |present: bool| if present { addresses.next() } else { None };
    let recv_addresses: Vec<Option<u64>> = planes.iter().map(|_| take(recv.is_some())).collect();
    let send_addresses: Vec<Option<u64>> = planes.iter().map(|_| take(send.is_some())).collect();
    let device_planes: Vec<Plane> = planes
        .iter()
        .enumerate()
        .map(|(i, &(cols, dtype))| Plane {
            send: send_addresses[i].unwrap_or(0),
            recv: recv_addresses[i].unwrap_or(0),
            row_bytes: cols * dtype.size(),
        })
        .collect();
    exchange.device_all_to_all(tag, &device_planes, send_counts, recv_counts, stream)?;
    Ok(recv)
}

/// A CUDA buffer as the transport sees it: where it is, and the stream its
/// producers and consumers are ordered on.
struct DeviceBuffer {
    address: u64,
    stream: u64,
}

/// The stream every buffer of an exchange is ordered on; CUDA's default stream
/// (0) when the rank has no buffer, so there is nothing to order.
fn one_stream(buffers: &[DeviceBuffer]) -> EpResult<u64> {
    let stream = buffers.first().map_or(0, |b| b.stream);
    if buffers.iter().any(|b| b.stream != stream) {
        return Err(EpError::Transport(
            "an exchange's buffers are ordered on different CUDA streams \
             (make its tensors on the rank's own thread)"
                .into(),
        ));
    }
    Ok(stream)
}

/// The device address of a contiguous tensor's first element, and its stream.
#[cfg(feature = "cuda")]
fn device_buffer<R: CubeRuntime>(tensor: &CubeTensor<R>) -> EpResult<DeviceBuffer> {
    use std::any::Any;
    let tensor = (tensor as &dyn Any)
        .downcast_ref::<CubeTensor<cubecl::cuda::CudaRuntime>>()
        .ok_or_else(not_cuda)?;
    let resource = tensor
        .client
        .get_resource(tensor.handle.clone())
        .map_err(|e| EpError::Transport(format!("no device address for a buffer: {e:?}")))?;
    let resource = resource.resource();
    Ok(DeviceBuffer {
        address: resource.ptr,
        // The stream is a field of burn-ep's cubecl-cuda patch (patches/cubecl-cuda).
        stream: resource.stream as u64,
    })
}

#[cfg(not(feature = "cuda"))]
fn device_buffer<R: CubeRuntime>(_tensor: &CubeTensor<R>) -> EpResult<DeviceBuffer> {
    Err(not_cuda())
}

fn not_cuda() -> EpError {
    EpError::Transport(
        "the transport moves CUDA device memory, but the backend is not CUDA \
         (use the local transport, or build with the `cuda` feature and the Cuda backend)"
            .into(),
    )
}
