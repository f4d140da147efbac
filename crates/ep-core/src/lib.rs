//! ep-core: the routing contract of burn-ep, with no tensor library in sight.
//!
//! - [`EpConfig`] describes a group; [`EpError`] names every kind of bad input.
//! - [`validate`] checks routing inputs; [`padding`] does the sequence-parallel arithmetic.
//! - [`layout`] is the host-side send layout the tensor-op fallback uses.
//! - [`reference`] is the plain-Rust oracle every backend and transport is tested against.
//! - [`counters`] counts what the data path does, for the bench.

#![warn(missing_docs)]

mod config;
pub mod counters;
mod error;
pub mod layout;
pub mod padding;
pub mod reference;
pub mod synthetic;
pub mod validate;

pub use config::EpConfig;
pub use error::{EpError, EpResult};
