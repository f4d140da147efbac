//! What the examples' command lines share: the backend names and the checks clap
//! does not make itself. Included with `#[path]`, as examples share no library.

use clap::error::ErrorKind;
use clap::{CommandFactory, ValueEnum};

/// The backends an example can run on; which of them a build has depends on its
/// features ([`refuse_unbuilt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendName {
    Ndarray,
    Wgpu,
    WgpuFusion,
    Cuda,
    CudaFusion,
}

/// A count that cannot be 0.
pub fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Exits with a usage error, as clap does for a bad value, when this build lacks
/// `backend`'s feature.
pub fn refuse_unbuilt<C: CommandFactory>(backend: BackendName) {
    let built_in = match backend {
        BackendName::Ndarray => true,
        BackendName::Wgpu => cfg!(feature = "wgpu"),
        BackendName::WgpuFusion => cfg!(all(feature = "wgpu", feature = "fusion")),
        BackendName::Cuda => cfg!(feature = "cuda"),
        BackendName::CudaFusion => cfg!(all(feature = "cuda", feature = "fusion")),
    };
    if !built_in {
        C::command()
            .error(
                ErrorKind::InvalidValue,
                format!(
                    "backend {} is not built in (build with its feature)",
                    name_of(backend)
                ),
            )
            .exit();
    }
}

/// The name a value has on the command line.
pub fn name_of(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}
