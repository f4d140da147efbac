//! ep-kernels: the CubeCL kernels of burn-ep, one file per family, following the
//! data flow of the book's *Architecture*: [`layout`] → [`slots`] → [`pack`] → (transport) →
//! [`expand`]; combine runs [`reduce`] → (transport) → [`sum`]; combine's backward
//! ends in [`combine_grad`]. The MoE layer's router uses [`router`] (or [`topk`]), its experts [`swiglu`].
//!
//! Kernels take flat arrays; the launch code lives with the backend (burn-ep's
//! `cube` module), which owns the tensors. Integer atomics are limited to adds and
//! plane operations are optional, so every kernel runs on lavapipe's WGSL.

pub mod combine_grad;
pub mod expand;
pub mod layout;
pub mod pack;
pub mod reduce;
pub mod router;
pub mod slots;
pub mod sum;
pub mod swiglu;
pub mod topk;
