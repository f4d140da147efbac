//! Zero-size tensors on every backend. Burn 0.21's CubeCL backends launch a grid of
//! zero blocks for most operations on a zero-size tensor, forward and backward;
//! CUDA refuses such a launch (wgpu accepts it), and the device is then unusable.
//! burn-ep's own operations never launch on zero-size tensors. What a rank with no
//! tokens still needs from outside them is a loss that reaches burn-ep's
//! operations, so that its backward pass joins its peers' exchanges: [`sum`].

use burn::tensor::{Shape, Tensor, TensorPrimitive};

use crate::ExpertParallelBackend;

/// The sum of all elements, as `Tensor::sum`, also on a zero-size tensor: there it
/// is a zero that still depends on `t`, made and differentiated without a kernel
/// launch, so that a rank with no tokens can write its loss the way its peers do.
pub fn sum<B: ExpertParallelBackend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
    if t.shape().num_elements() > 0 {
        return t.sum();
    }
    zeros_after(t, [1])
}

/// Zeros of `shape` that depend on `parent` (with a zero derivative), made without a
/// launch on a zero-size tensor on either side.
pub(crate) fn zeros_after<B: ExpertParallelBackend, const D: usize, const E: usize>(
    parent: Tensor<B, D>,
    shape: [usize; E],
) -> Tensor<B, E> {
    let parent = parent.into_primitive().tensor();
    Tensor::from_primitive(TensorPrimitive::Float(B::ep_zeros_after(
        parent,
        Shape::new(shape),
    )))
}
