//! How burn-ep's device paths reach a CubeCL runtime's buffers: the device
//! transports and cuBLAS need a CUDA buffer's address and the stream that orders
//! it. A typed trait of the runtime says whether it has them, so the CubeCL
//! backends need no run-time downcast to find out.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use ep_core::{EpError, EpResult};

/// A CubeCL runtime burn-ep's CubeCL backends run on. It is implemented for the
/// runtimes of the backends burn-ep builds with: wgpu's (feature `wgpu`: WebGPU,
/// Vulkan, Metal) and CUDA's (feature `cuda`), the one whose buffers the device
/// transports and cuBLAS use.
pub trait EpRuntime: CubeRuntime {
    /// Whether the runtime's buffers are CUDA memory, which
    /// [`cuda_buffer`](Self::cuda_buffer) then gives.
    const CUDA: bool = false;

    /// The CUDA memory behind `tensor`'s buffer; an error naming the mismatch on a
    /// runtime that is not CUDA's.
    fn cuda_buffer(_tensor: &CubeTensor<Self>) -> EpResult<CudaBuffer> {
        Err(not_cuda())
    }

    /// Runs `launch` with each kernel argument whose buffer starts at `from` bound
    /// to address `to` instead, for each `(from, to)` of `redirects` (a peer's
    /// buffer, through burn-ep's `cubecl-cuda` patch); an error naming the mismatch
    /// on a runtime that is not CUDA's.
    ///
    /// # Safety
    ///
    /// As `cubecl_cuda::with_redirected_arguments`: every `to` is reachable from
    /// this rank's device and valid for all the kernel touches through it, until
    /// the kernel ends, and the kernel is launched without bounds checks.
    unsafe fn with_redirected<T>(
        _redirects: &[(u64, u64)],
        _launch: impl FnOnce() -> T,
    ) -> EpResult<T> {
        Err(not_cuda())
    }
}

/// A CUDA buffer as the transports and cuBLAS see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaBuffer {
    /// The device address of the tensor's first element.
    pub address: u64,
    /// The CUDA stream its producers and consumers are ordered on.
    pub stream: u64,
    /// The GPU it is on.
    pub ordinal: usize,
}

#[cfg(feature = "wgpu")]
impl EpRuntime for cubecl::wgpu::WgpuRuntime {}

#[cfg(feature = "cuda")]
impl EpRuntime for cubecl::cuda::CudaRuntime {
    const CUDA: bool = true;

    fn cuda_buffer(tensor: &CubeTensor<Self>) -> EpResult<CudaBuffer> {
        let resource = tensor
            .client
            .get_resource(tensor.handle.clone())
            .map_err(|e| EpError::Transport(format!("no device address for a buffer: {e:?}")))?;
        let resource = resource.resource();
        Ok(CudaBuffer {
            address: resource.ptr,
            // The stream is a field of burn-ep's cubecl-cuda patch (patches/cubecl-cuda).
            stream: resource.stream as u64,
            ordinal: tensor.device.ordinal(),
        })
    }

    unsafe fn with_redirected<T>(
        redirects: &[(u64, u64)],
        launch: impl FnOnce() -> T,
    ) -> EpResult<T> {
        // SAFETY: the caller's contract is the patch's.
        Ok(unsafe { cubecl::cuda::with_redirected_arguments(redirects, launch) })
    }
}

/// The error of a CUDA path on a runtime that is not CUDA's.
pub(crate) fn not_cuda() -> EpError {
    EpError::Transport(
        "the transport moves CUDA device memory, but the backend is not CUDA \
         (use the local transport, or build with the `cuda` feature and the Cuda backend)"
            .into(),
    )
}
