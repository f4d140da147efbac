//! The device path of the exchange on CubeCL backends: the send buffers and the
//! receive buffers are handed to the transport as device pointers, so rows never
//! leave the GPU. Only CUDA buffers have pointers a CUDA transport can use; any
//! other runtime gets an error naming the mismatch ([`EpRuntime`]).

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use ep_core::{EpError, EpResult};
use ep_mesh::Plane;

use crate::cube::alloc;
use crate::exchange::{ExchangeTag, SharedExchange};
use crate::runtime::{CudaBuffer, EpRuntime};

/// Moves the planes of `send` (each `[S, cols]`, segments in rank order) through
/// `exchange` in one exchange; returns the received planes (`[R, cols]` each, of
/// the `planes`' columns and dtypes), `None` when nothing came.
pub(crate) fn device_exchange<R: EpRuntime>(
    tag: ExchangeTag,
    send: Option<Vec<CubeTensor<R>>>,
    planes: &[(usize, DType)],
    send_counts: &[usize],
    recv_counts: &[usize],
    device: &R::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<Vec<CubeTensor<R>>>> {
    let send: Option<Vec<_>> = send.map(|planes| planes.into_iter().map(into_contiguous).collect());
    let recv = alloc_planes::<R>(device, planes, recv_counts.iter().sum());
    let counts = Counts {
        send: send_counts,
        recv: recv_counts,
        local_placed: false,
    };
    exchange_into(
        tag,
        send.as_deref(),
        recv.as_deref(),
        planes,
        counts,
        exchange,
    )?;
    Ok(recv)
}

/// Fresh contiguous buffers `[rows, cols]` of each plane's columns and dtype;
/// `None` for no rows (CUDA refuses zero-size buffers' launches).
pub(crate) fn alloc_planes<R: CubeRuntime>(
    device: &R::Device,
    planes: &[(usize, DType)],
    rows: usize,
) -> Option<Vec<CubeTensor<R>>> {
    let client = R::client(device);
    (rows > 0).then(|| {
        planes
            .iter()
            .map(|&(cols, dtype)| alloc::<R, 2>(&client, device, [rows, cols], dtype))
            .collect()
    })
}

/// The row counts of an exchange, and whether each rank's own rows are already in
/// its receive buffers (see [`ep_mesh::DeviceExchange::all_to_all_v`]).
#[derive(Clone, Copy)]
pub(crate) struct Counts<'a> {
    pub send: &'a [usize],
    pub recv: &'a [usize],
    pub local_placed: bool,
}

/// One exchange from the contiguous buffers `send` (segments in rank order) into
/// `recv` (segments in source-rank order), one of each per plane (`planes`: their
/// columns and dtypes); `None` where this rank sends or receives no rows.
pub(crate) fn exchange_into<R: EpRuntime>(
    tag: ExchangeTag,
    send: Option<&[CubeTensor<R>]>,
    recv: Option<&[CubeTensor<R>]>,
    planes: &[(usize, DType)],
    counts: Counts<'_>,
    exchange: &SharedExchange,
) -> EpResult<()> {
    let addresses = |buffers: Option<&[CubeTensor<R>]>| {
        buffers
            .map(|b| b.iter().map(R::cuda_buffer).collect::<EpResult<Vec<_>>>())
            .transpose()
    };
    let (send, recv) = (addresses(send)?, addresses(recv)?);
    // The kernels that wrote the send buffers are queued on this thread's stream,
    // and those that read the receive buffers will be: the transport orders its
    // copies between them on the device, so the host does not wait here.
    let all: Vec<&CudaBuffer> = recv.iter().chain(send.iter()).flatten().collect();
    let stream = one_stream(&all)?;
    let address =
        |buffers: &Option<Vec<CudaBuffer>>, i: usize| buffers.as_ref().map_or(0, |b| b[i].address);
    let device_planes: Vec<Plane> = planes
        .iter()
        .enumerate()
        .map(|(i, &(cols, dtype))| Plane {
            send: address(&send, i),
            recv: address(&recv, i),
            row_bytes: cols * dtype.size(),
        })
        .collect();
    exchange.device_all_to_all(
        tag,
        &device_planes,
        counts.send,
        counts.recv,
        counts.local_placed,
        stream,
    )
}

/// The stream every buffer of an exchange is ordered on; CUDA's default stream
/// (0) when the rank has no buffer, so there is nothing to order.
fn one_stream(buffers: &[&CudaBuffer]) -> EpResult<u64> {
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
