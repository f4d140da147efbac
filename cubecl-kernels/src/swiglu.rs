//! SwiGLU's element-wise part, `silu(gate) · up`, and its backward, each in one
//! pass: Burn's `silu` on half precision is a chain of f32 ops with casts around
//! them (eight launches forward, more backward, each reading and writing the whole
//! tensor). Here every element is read once, computed in f32 and written once.

use cubecl::prelude::*;

/// `sigmoid(x) = 1 / (1 + e^-x)`, lane by lane.
#[cube]
fn sigmoid<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(1.0);
    one / (one + (Vector::<f32, N>::new(0.0) - x).exp())
}

/// One unit per vector: `out = silu(gate) · up`, with `silu(g) = g · sigmoid(g)`.
#[cube(launch)]
pub fn swiglu_kernel<F: Float, N: Size>(
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    vectors: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if i >= vectors {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let u = Vector::<f32, N>::cast_from(up[i]);
    out[i] = Vector::<F, N>::cast_from(g * sigmoid::<N>(g) * u);
}

/// One unit per vector, from the output's gradient `grad`:
/// `grad_up = grad · silu(gate)` and
/// `grad_gate = grad · up · sigmoid(gate) · (1 + gate · (1 - sigmoid(gate)))`.
#[cube(launch)]
pub fn swiglu_grad_kernel<F: Float, N: Size>(
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    grad: &Array<Vector<F, N>>,
    grad_gate: &mut Array<Vector<F, N>>,
    grad_up: &mut Array<Vector<F, N>>,
    vectors: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = CUBE_POS * (CUBE_DIM as usize) + UNIT_POS as usize;
    if i >= vectors {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let u = Vector::<f32, N>::cast_from(up[i]);
    let d = Vector::<f32, N>::cast_from(grad[i]);
    let s = sigmoid::<N>(g);
    let one = Vector::<f32, N>::new(1.0);
    grad_up[i] = Vector::<F, N>::cast_from(d * g * s);
    grad_gate[i] = Vector::<F, N>::cast_from(d * u * s * (one + g * (one - s)));
}
