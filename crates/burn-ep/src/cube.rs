//! `ExpertParallelBackend` for CubeCL backends (wgpu, CUDA): the kernels of `ep-kernels`.

use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::backend::ExpertParallelBackend;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ExpertParallelBackend
    for CubeBackend<R, F, I, BT>
{
}
