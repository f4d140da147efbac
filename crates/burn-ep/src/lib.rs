//! burn-ep: expert parallelism for Burn.
//!
//! An [`EpGroup`] is one rank's member of a group of ranks that share the experts of
//! a Mixture-of-Experts layer. [`EpGroup::dispatch`] sends every token to the ranks
//! that hold its top-k experts and returns the rows grouped by local expert, with a
//! [`Routing`] handle; [`EpGroup::dispatch_cached`] replays a handle with a new
//! payload; [`EpGroup::combine`] brings the expert outputs back, weighted and summed.
//! [`EpGroup::dispatch_rank_major`] returns each received token once instead, with
//! its local expert ids and weights (see [`DispatchLayout`]).
//!
//! The steps run on any backend implementing [`ExpertParallelBackend`]: CubeCL
//! backends (wgpu, CUDA) run the kernels of `ep-kernels`, also under Burn's fusion
//! (`burn::backend::Wgpu` and `Cuda` with Burn's default features), others a
//! tensor-op fallback.

#![warn(missing_docs)]

mod autodiff;
mod backend;
mod cube;
mod cube_direct;
mod cube_exchange;
mod cube_route;
#[cfg(feature = "cuda")]
mod cublas;
mod exchange;
mod fusion;
mod group;
pub mod moe;
mod order;
#[doc(hidden)]
pub mod profiling;
mod routing;
mod runner;
mod runtime;
pub mod steps;
mod transfer;
pub mod zero_size;

/// The book's chapters, so that rustdoc compiles and runs their Rust snippets with
/// this crate's doctests (`cargo test --doc`), as it does the API's own examples.
#[cfg(doctest)]
mod book {
    #[doc = include_str!("../../../book/src/introduction.md")]
    mod introduction {}
    #[doc = include_str!("../../../book/src/quickstart.md")]
    mod quickstart {}
    #[doc = include_str!("../../../book/src/contract.md")]
    mod contract {}
    #[doc = include_str!("../../../book/src/architecture.md")]
    mod architecture {}
    #[doc = include_str!("../../../book/src/transports.md")]
    mod transports {}
    #[doc = include_str!("../../../book/src/multinode.md")]
    mod multinode {}
    #[doc = include_str!("../../../book/src/kernels.md")]
    mod kernels {}
    #[doc = include_str!("../../../book/src/moe_model.md")]
    mod moe_model {}
    #[doc = include_str!("../../../book/src/language_model.md")]
    mod language_model {}
    #[doc = include_str!("../../../book/src/training.md")]
    mod training {}
    #[doc = include_str!("../../../book/src/benchmarks.md")]
    mod benchmarks {}
    #[doc = include_str!("../../../book/src/reference.md")]
    mod reference {}
}

pub use backend::{DispatchLayout, ExpertParallelBackend};
pub use ep_core::{counters, EpConfig, EpError, EpResult};
pub use ep_mesh::{IntraProcess, DEFAULT_TIMEOUT};
pub use group::{Dispatched, EpGroup, RankMajorDispatched};
pub use routing::Routing;
pub use runner::{launch, run_ranks, RunOptions, Transport};

#[cfg(test)]
mod reference_chapter {
    /// The names this file exports: the last segment of every `pub use` path (or
    /// each name in its braces) and every `pub mod`.
    fn exports(lib: &str) -> Vec<String> {
        let mut names = Vec::new();
        for item in lib.split(';') {
            let item = item.trim_start();
            let item = item.rsplit("\n\n").next().unwrap_or(item).trim();
            // Attributes and comments before the item (`#[doc(hidden)]`) are not its name.
            let item: String = item
                .lines()
                .skip_while(|l| {
                    l.trim_start().starts_with("#[") || l.trim_start().starts_with("//")
                })
                .collect::<Vec<_>>()
                .join("\n");
            let item = item.as_str();
            if let Some(path) = item.strip_prefix("pub use ") {
                let inner = match (path.find('{'), path.rfind('}')) {
                    (Some(open), Some(close)) => &path[open + 1..close],
                    _ => path.rsplit("::").next().unwrap_or(path),
                };
                names.extend(inner.split(',').map(|n| n.trim().to_string()));
            } else if let Some(name) = item.strip_prefix("pub mod ") {
                names.push(name.trim().to_string());
            }
        }
        names.retain(|n| !n.is_empty());
        names
    }

    /// The book's reference chapter names every item the crate exports, so that a
    /// new export must be placed there: used by programs, for backends, or machinery.
    #[test]
    fn names_every_export() {
        let chapter = include_str!("../../../book/src/reference.md");
        let mut names = exports(include_str!("lib.rs"));
        assert!(names.len() > 15, "the exports were not found: {names:?}");
        let modules = [include_str!("steps.rs"), include_str!("profiling.rs")];
        for module in modules {
            let found = exports(module);
            assert!(
                found.len() > 5,
                "the module's exports were not found: {found:?}"
            );
            names.extend(found);
        }
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !chapter.contains(&format!("`{n}")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in book/src/reference.md: {missing:?}"
        );
    }
}
