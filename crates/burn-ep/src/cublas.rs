//! Batched matrix products on cuBLAS, for CUDA buffers of CubeCL tensors: the GEMM
//! PyTorch's figures come from, several times faster than Burn 0.21's matmul at the
//! MoE layer's shapes (see the book's benchmarks). The products are queued on the
//! stream that owns the output buffer (burn-ep's cubecl-cuda patch names it), so
//! they are ordered with the surrounding kernels without a host wait.

use std::cell::RefCell;
use std::collections::hash_map::{Entry, HashMap};
use std::ffi::c_void;

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cudarc::cublas::{result as cublas, sys};
use cudarc::driver::{result as driver, sys as driver_sys};

use crate::cube::alloc;
use crate::runtime::{CudaBuffer, EpRuntime};

/// `op(a) · op(b)` for every batch of `a [G, M, K]` (`[G, K, M]` when `transpose_a`)
/// and `b [G, K, N]` (`[G, N, K]` when `transpose_b`): `[G, M, N]`, accumulated in
/// f32. `None` where cuBLAS cannot take it: not a CUDA tensor, a dtype other than
/// f32, f16 and bf16, an empty product, or no cuBLAS library on the host.
pub(crate) fn batched_matmul<R: EpRuntime>(
    a: &CubeTensor<R>,
    b: &CubeTensor<R>,
    transpose_a: bool,
    transpose_b: bool,
) -> Option<CubeTensor<R>> {
    let data_type = data_type(a.dtype)?;
    if !R::CUDA || b.dtype != a.dtype || !library_present() {
        return None;
    }
    let (a_dims, b_dims) = (dims3(a), dims3(b));
    let (g, m, k) = match transpose_a {
        false => (a_dims[0], a_dims[1], a_dims[2]),
        true => (a_dims[0], a_dims[2], a_dims[1]),
    };
    let n = if transpose_b { b_dims[1] } else { b_dims[2] };
    let b_k = if transpose_b { b_dims[2] } else { b_dims[1] };
    assert!(
        b_dims[0] == g && b_k == k,
        "batched product of {a_dims:?} and {b_dims:?} (transposed: {transpose_a}, \
         {transpose_b}): the batch or inner sizes differ"
    );
    if g * m * n * k == 0 || [g, m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return None;
    }
    let (a, b) = (as_rows(a), as_rows(b));
    let out = alloc::<R, 3>(&a.client, &a.device, [g, m, n], a.dtype);
    let buffer = |t: &CubeTensor<R>| {
        R::cuda_buffer(t).unwrap_or_else(|e| panic!("cuBLAS: no CUDA buffer for an operand: {e}"))
    };
    let (a_buf, b_buf, out_buf) = (buffer(&a), buffer(&b), buffer(&out));
    let operand = |t: &CubeTensor<R>, buffer: CudaBuffer| {
        let strides = t.meta.strides();
        Operand {
            address: buffer.address,
            row_stride: strides[1],
            batch_stride: strides[0],
        }
    };
    let product = Product {
        g,
        m,
        n,
        k,
        transpose_a,
        transpose_b,
        data_type,
        a: operand(&a, a_buf),
        b: operand(&b, b_buf),
        out: out_buf.address,
    };
    let stream = out_buf.stream as driver_sys::CUstream;
    with_handle(out_buf.ordinal, stream, |handle| product.queue(handle))
        .unwrap_or_else(|e| panic!("cuBLAS batched product {product:?} failed: {e}"));
    Some(out)
}

/// `t` as cuBLAS can read it: batches of rows whose elements are adjacent, at
/// any row and batch stride. Burn pads the rows of tensors whose row length is not
/// aligned (1408 bf16 values, say), which cuBLAS reads in place; anything else
/// (a permuted view) is copied first.
fn as_rows<R: CubeRuntime>(t: &CubeTensor<R>) -> CubeTensor<R> {
    let [_, rows, cols] = dims3(t);
    let strides = t.meta.strides();
    let readable = strides[2] == 1
        && strides[1] >= cols
        && strides[0] >= rows * strides[1]
        && strides[1] <= i32::MAX as usize;
    match readable {
        true => t.clone(),
        false => into_contiguous(t.clone()),
    }
}

/// Where a batched operand lives: its first element, and the distance in elements
/// from one row, and one batch, to the next.
#[derive(Debug, Clone, Copy)]
struct Operand {
    address: u64,
    row_stride: usize,
    batch_stride: usize,
}

/// One strided batched GEMM in row-major terms.
#[derive(Debug, Clone, Copy)]
struct Product {
    g: usize,
    m: usize,
    n: usize,
    k: usize,
    transpose_a: bool,
    transpose_b: bool,
    data_type: sys::cudaDataType,
    a: Operand,
    b: Operand,
    out: u64,
}

impl Product {
    /// cuBLAS is column-major, and a row-major `[r, c]` matrix is a column-major
    /// `[c, r]` one: the row-major `out = op(a) op(b)` is the column-major
    /// `outᵀ = op(b)ᵀ op(a)ᵀ`, so `b` goes first.
    fn queue(&self, handle: sys::cublasHandle_t) -> Result<(), String> {
        let (g, m, n, k) = (self.g, self.m, self.n, self.k);
        let op = |t: bool| match t {
            false => sys::cublasOperation_t::CUBLAS_OP_N,
            true => sys::cublasOperation_t::CUBLAS_OP_T,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        unsafe {
            cublas::gemm_strided_batched_ex(
                handle,
                op(self.transpose_b),
                op(self.transpose_a),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                self.b.address as *const c_void,
                self.data_type,
                self.b.row_stride as i32,
                self.b.batch_stride as i64,
                self.a.address as *const c_void,
                self.data_type,
                self.a.row_stride as i32,
                self.a.batch_stride as i64,
                &beta as *const f32 as *const c_void,
                self.out as *mut c_void,
                self.data_type,
                n as i32,
                (m * n) as i64,
                g as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }
}

fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

fn dims3<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 3] {
    let shape = t.shape();
    [shape[0], shape[1], shape[2]]
}

fn library_present() -> bool {
    thread_local! {
        static PRESENT: bool = unsafe { sys::is_culib_present() };
    }
    PRESENT.with(|p| *p)
}

/// A cuBLAS handle of one device, made on the thread that uses it (handles are
/// not shared between threads) and destroyed with the thread.
struct Handle {
    handle: sys::cublasHandle_t,
    context: driver_sys::CUcontext,
}

impl Drop for Handle {
    fn drop(&mut self) {
        unsafe {
            if driver::ctx::set_current(self.context).is_ok() {
                let _ = cublas::destroy_handle(self.handle);
            }
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<usize, Handle>> = RefCell::new(HashMap::new());
}

/// Runs `work` with this thread's handle of CUDA device `ordinal`, its context
/// current and its stream set to `stream`.
fn with_handle<T>(
    ordinal: usize,
    stream: driver_sys::CUstream,
    work: impl FnOnce(sys::cublasHandle_t) -> Result<T, String>,
) -> Result<T, String> {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        let set_current = |context| {
            unsafe { driver::ctx::set_current(context) }
                .map_err(|e| format!("cuCtxSetCurrent: {e:?}"))
        };
        let handle = match handles.entry(ordinal) {
            Entry::Occupied(made) => made.into_mut(),
            Entry::Vacant(slot) => {
                // cuBLAS binds a handle to the context current when it is made.
                let context = ep_mesh::primary_context(ordinal).map_err(|e| e.to_string())?;
                set_current(context)?;
                let handle = cublas::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
                slot.insert(Handle { handle, context })
            }
        };
        set_current(handle.context)?;
        unsafe { cublas::set_stream(handle.handle, stream as sys::cudaStream_t) }
            .map_err(|e| format!("cublasSetStream: {e:?}"))?;
        work(handle.handle)
    })
}
