//! The main job: trains a small MoE language model on a synthetic task with W
//! simulated ranks (threads) in one process; experts are split over the ranks.
//!
//!     cargo run --release --example train_moe -- --ranks 4 --backend ndarray --steps 300

#[path = "../common/cli.rs"]
mod cli;
mod model;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_ep::{run_ranks, EpConfig, EpGroup, ExpertParallelBackend, RunOptions, Transport};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};
use cli::{at_least_one, name_of, refuse_unbuilt, BackendName};
use indicatif::{ProgressBar, ProgressStyle};
use model::{train, TrainConfig};

/// CubeCL's backends without Burn's fusion (see `--backend`).
#[cfg(feature = "wgpu")]
type Wgpu = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
#[cfg(feature = "cuda")]
type Cuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// train_moe: train a small MoE model with expert parallelism.
#[derive(Debug, Parser)]
#[command(name = "train_moe", after_help = AFTER_HELP)]
struct Options {
    /// Simulated ranks (threads sharing the device)
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    ranks: usize,
    /// CubeCL's backends as they are, or under Burn's fusion (`*-fusion`, as Burn's
    /// default features give them); cuda needs the `cuda` feature
    #[arg(long, value_enum, default_value_t = BackendName::Ndarray)]
    backend: BackendName,
    /// Optimizer steps
    #[arg(long, default_value_t = 300, value_parser = at_least_one)]
    steps: usize,
    /// Sequence-parallel size (pads the tokens per rank)
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    sp: usize,
    /// local | cuda-peer (rows by device copies; --backend cuda) | nccl |
    /// hierarchical (one GPU per rank; --backend cuda); by default cuda-peer on
    /// cuda, local elsewhere
    #[arg(long)]
    transport: Option<Transport>,
    /// The model and batch: small, or one whose MoE layers are GPU-sized (hidden
    /// 1024, 64 experts of width 1408, top-6, 8192 tokens per step)
    #[arg(long, value_enum, default_value_t = Size::Small)]
    size: Size,
    /// Overrides the size's hidden width
    #[arg(long)]
    hidden: Option<usize>,
    /// Overrides the size's expert width
    #[arg(long)]
    ffn: Option<usize>,
    /// Overrides the size's expert count
    #[arg(long)]
    experts: Option<usize>,
    /// Overrides the size's experts per token
    #[arg(long)]
    top_k: Option<usize>,
    /// Overrides the size's MoE layers
    #[arg(long)]
    layers: Option<usize>,
    /// Overrides the size's tokens per step (all ranks)
    #[arg(long)]
    tokens: Option<usize>,
    /// Overrides the size's vocabulary
    #[arg(long)]
    vocab: Option<usize>,
    /// Compile every CUDA kernel again instead of loading what an earlier run of
    /// this build compiled (kept under `target/kernel-cache/`)
    #[arg(long)]
    no_kernel_cache: bool,
}

const AFTER_HELP: &str = "Prints the loss, tokens per second and the model's TFLOP/s \
(forward and backward products, per second of the whole run, compilation of the kernels \
included). On a terminal the progress is a bar; elsewhere a line every tenth of the run.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Size {
    Small,
    Gpu,
}

impl Options {
    /// The transport given, or by default the one a backend's devices want: rows by
    /// device copies on CUDA, through the host elsewhere.
    fn transport(&self) -> Transport {
        let default = if self.on_cuda() {
            Transport::CudaPeer
        } else {
            Transport::Local
        };
        self.transport.unwrap_or(default)
    }

    /// Whether the backend is CUDA's, with or without fusion.
    fn on_cuda(&self) -> bool {
        matches!(self.backend, BackendName::Cuda | BackendName::CudaFusion)
    }

    /// The size's model and batch, with the figures given beside it.
    fn train_config(&self) -> TrainConfig {
        let mut config = match self.size {
            Size::Small => TrainConfig::default(),
            Size::Gpu => TrainConfig::gpu(),
        };
        let overrides = [
            (self.hidden, &mut config.hidden),
            (self.ffn, &mut config.ffn_hidden),
            (self.experts, &mut config.num_experts),
            (self.top_k, &mut config.top_k),
            (self.layers, &mut config.layers),
            (self.tokens, &mut config.global_tokens),
            (self.vocab, &mut config.vocab),
        ];
        for (given, figure) in overrides {
            if let Some(value) = given {
                *figure = value;
            }
        }
        config.sp_size = self.sp;
        config
    }
}

/// Rank 0's progress: a bar on a terminal, else a plain line every tenth of the run
/// (and at the last step), so that logs stay readable.
struct Progress {
    /// Hidden off a terminal.
    bar: ProgressBar,
    steps: usize,
}

impl Progress {
    fn new(steps: usize) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(steps as u64).with_style(
                ProgressStyle::with_template("[{bar:30}] step {pos:>4}/{len}  {msg}")
                    .expect("a valid template")
                    .progress_chars("#> "),
            )
        } else {
            ProgressBar::hidden()
        };
        Self { bar, steps }
    }

    fn step(&self, step: usize, loss: f32, tokens_per_second: f64) {
        let message = format!("loss {loss:.4}  {tokens_per_second:>8.0} tokens/s");
        if !self.bar.is_hidden() {
            self.bar.set_position(step as u64);
            self.bar.set_message(message);
        } else if step.is_multiple_of(self.steps.div_ceil(10)) || step == self.steps {
            eprintln!("step {step:>4}/{}  {message}", self.steps);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn run<B: AutodiffBackend + ExpertParallelBackend>(
    config: &TrainConfig,
    ranks: usize,
    steps: usize,
    transport: Transport,
    device: fn(usize) -> B::Device,
) {
    let ep = EpConfig::new(ranks, config.num_experts, config.top_k, config.hidden)
        .with_max_tokens_per_rank(config.global_tokens)
        // One row count for every local expert: the MoE layer runs its experts
        // on the dispatched rows in place.
        .with_uniform_expert_rows(true)
        .with_sp_size(config.sp_size);
    let start = Instant::now();
    // The transports' finer options (ranks per simulated node, the route inside a
    // process, NCCL's loopback) come from the environment, which this program
    // reads on purpose; see `RunOptions::from_env`.
    let options = RunOptions::from_env()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_timeout(Duration::from_secs(300));
    let progress = Progress::new(steps);
    let results = run_ranks(
        transport,
        &options,
        &ep,
        |_, ordinal| device(ordinal),
        |group: EpGroup<B>| {
            let rank = group.rank();
            train(config, &group, steps, |r| {
                if rank == 0 {
                    let seen = (r.step + 1) * config.global_tokens;
                    let rate = seen as f64 / start.elapsed().as_secs_f64();
                    progress.step(r.step + 1, r.loss, rate);
                }
            })
        },
    );
    progress.finish();
    let history = match results.and_then(|r| r.into_iter().next().unwrap()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("train_moe: rank 0 failed: {e}");
            std::process::exit(1);
        }
    };
    let (first, last) = (&history[0], history.last().unwrap());
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "trained {steps} steps on {ranks} ranks in {seconds:.1}s: loss {:.4} -> {:.4} (chance: {:.4})",
        first.loss,
        last.loss,
        (config.vocab as f32).ln()
    );
    let tokens = (steps * config.global_tokens) as f64;
    println!(
        "{:.0} tokens/s, {:.2} TFLOP/s ({:.1} GFLOP per step over all ranks: the router, expert and head products, forward and backward)",
        tokens / seconds,
        steps as f64 * config.step_flops() as f64 / seconds / 1e12,
        config.step_flops() as f64 / 1e9,
    );
    println!("expert loads at the last step (token-expert pairs per expert, whole group):");
    let local = config.num_experts / ranks;
    for (layer, loads) in last.loads.iter().enumerate() {
        let per_rank: Vec<usize> = loads.chunks(local).map(|c| c.iter().sum()).collect();
        println!("  layer {layer}: per expert {loads:?}, per rank {per_rank:?}");
    }
}

/// Keeps the kernels NVRTC compiles (their PTX) between runs, unless a `cubecl.toml`
/// already chose where: compiling them is most of a short run on a GPU. CubeCL finds
/// a cached kernel by its name and compile-time arguments, not its code, so the
/// cache is kept per build of this program: `target/kernel-cache/train_moe-<build>`,
/// where `<build>` changes whenever the binary does.
fn keep_compiled_kernels() {
    use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        config.compilation.cache =
            kernel_cache_of_this_build(&CacheConfig::Target.root()).map(CacheConfig::File);
    }
    CubeClRuntimeConfig::set(config);
}

/// `root/kernel-cache/train_moe-<build>`, named by this binary's size and time of
/// writing; `None` (no cache) where the binary cannot be read. Earlier builds'
/// folders stay (a few MB each; `cargo clean` removes them): one may be in use by a
/// run of that build, and CubeCL panics on a cache file removed under it.
fn kernel_cache_of_this_build(root: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let binary = std::fs::metadata(std::env::current_exe().ok()?).ok()?;
    let mut hasher = DefaultHasher::new();
    (binary.len(), binary.modified().ok()?).hash(&mut hasher);
    Some(
        root.join("kernel-cache")
            .join(format!("train_moe-{:016x}", hasher.finish())),
    )
}

fn main() {
    let o = Options::parse();
    refuse_unbuilt::<Options>(o.backend);
    // NVRTC's compilation is what the cache saves; the CPU compiles no kernels.
    if o.on_cuda() && !o.no_kernel_cache {
        keep_compiled_kernels();
    }
    let config = o.train_config();
    let (ranks, steps) = (o.ranks, o.steps);
    let transport = o.transport();
    if config.num_experts % ranks != 0 || config.global_tokens % ranks != 0 {
        Options::command()
            .error(
                ErrorKind::ValueValidation,
                format!(
                    "--ranks {ranks} must divide {} experts and {} tokens",
                    config.num_experts, config.global_tokens
                ),
            )
            .exit();
    }
    println!(
        "train_moe: {} layers, {} experts (top-{}), hidden {}, {} tokens per step, {ranks} ranks on {}, {transport} transport",
        config.layers,
        config.num_experts,
        config.top_k,
        config.hidden,
        config.global_tokens,
        name_of(o.backend)
    );
    match o.backend {
        BackendName::Ndarray => {
            run::<Autodiff<burn::backend::NdArray<f32>>>(&config, ranks, steps, transport, |_| {
                Default::default()
            })
        }
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => {
            run::<Autodiff<Wgpu>>(&config, ranks, steps, transport, |_| Default::default())
        }
        #[cfg(all(feature = "wgpu", feature = "fusion"))]
        BackendName::WgpuFusion => {
            run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(&config, ranks, steps, transport, |_| {
                Default::default()
            })
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => run::<Autodiff<Cuda>>(
            &config,
            ranks,
            steps,
            transport,
            burn::backend::cuda::CudaDevice::new,
        ),
        #[cfg(all(feature = "cuda", feature = "fusion"))]
        BackendName::CudaFusion => run::<Autodiff<burn::backend::Cuda<f32, i32>>>(
            &config,
            ranks,
            steps,
            transport,
            burn::backend::cuda::CudaDevice::new,
        ),
        // Every backend is built in where every feature is on.
        #[allow(unreachable_patterns)]
        other => unreachable!("{other:?} was checked by refuse_unbuilt"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_override_the_size_wherever_they_stand() {
        let gpu = TrainConfig::gpu();
        for args in [
            ["train_moe", "--size", "gpu", "--hidden", "64"],
            ["train_moe", "--hidden", "64", "--size", "gpu"],
        ] {
            let config = Options::try_parse_from(args).unwrap().train_config();
            assert_eq!(config.hidden, 64);
            assert_eq!(config.num_experts, gpu.num_experts);
            assert_eq!(config.global_tokens, gpu.global_tokens);
        }
        let small = Options::try_parse_from(["train_moe"])
            .unwrap()
            .train_config();
        assert_eq!(small.hidden, TrainConfig::default().hidden);
    }

    /// The cache folder is this build's: the same for every run of one binary, under
    /// `kernel-cache`, named by a hash of the binary.
    #[test]
    fn the_kernel_cache_is_named_by_this_build() {
        let root = std::path::Path::new("target-of-a-test");
        let folder = kernel_cache_of_this_build(root).expect("the test binary can be read");
        assert_eq!(Some(&folder), kernel_cache_of_this_build(root).as_ref());
        assert_eq!(folder.parent(), Some(root.join("kernel-cache").as_path()));
        let name = folder.file_name().unwrap().to_string_lossy().into_owned();
        let hash = name
            .strip_prefix("train_moe-")
            .expect("named after the program");
        assert!(
            hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
    }

    #[test]
    fn the_transport_follows_the_backend_unless_given() {
        let transport = |args: &[&str]| Options::try_parse_from(args).unwrap().transport();
        assert_eq!(transport(&["train_moe"]), Transport::Local);
        assert_eq!(
            transport(&["train_moe", "--backend", "cuda"]),
            Transport::CudaPeer
        );
        assert_eq!(
            transport(&["train_moe", "--backend", "cuda", "--transport", "local"]),
            Transport::Local
        );
        assert_eq!(
            transport(&["train_moe", "--backend", "wgpu"]),
            Transport::Local
        );
    }

    #[test]
    fn a_bad_value_is_refused_and_named() {
        for (flag, value) in [
            ("--size", "huge"),
            ("--backend", "tpu"),
            ("--transport", "infiniband"),
            ("--steps", "0"),
            ("--hidden", "wide"),
        ] {
            let message = Options::try_parse_from(["train_moe", flag, value])
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(value) && message.contains(flag),
                "{message}"
            );
        }
    }
}
