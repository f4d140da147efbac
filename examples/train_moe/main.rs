//! The main job: trains a small transformer language model whose feed-forward
//! layers are MoE layers, on text (by default the repository's own prose), with W
//! ranks as threads of this process and the experts split over them.
//!
//!     cargo run --release --example train_moe -- --ranks 4 --backend ndarray --steps 300
//!
//! `--task mapping` trains the earlier synthetic task instead (the fixture of
//! `tests/moe.rs`).

mod checkpoint;
#[path = "../common/cli.rs"]
mod cli;
mod grads;
mod lm;
mod lm_training;
mod mapping;
mod options;
mod plot;
mod text;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_ep::{run_ranks, EpConfig, EpGroup, ExpertParallelBackend, RunOptions, Transport};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use cli::{name_of, refuse_unbuilt, BackendName};
use indicatif::{ProgressBar, ProgressStyle};
use lm_training::{train_text, TextRun};
use mapping::{train, TrainConfig};
use options::{Job, Options};
use text::Corpus;

/// CubeCL's backends without Burn's fusion (see `--backend`).
#[cfg(feature = "wgpu")]
type Wgpu = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
#[cfg(feature = "cuda")]
type Cuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Rank 0's progress: a bar on a terminal, else a plain line every tenth of the run
/// (and at the last step), so that logs stay readable.
struct Progress {
    /// Hidden off a terminal.
    bar: ProgressBar,
    steps: usize,
}

impl Progress {
    fn new(first: usize, steps: usize) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(steps as u64).with_style(
                ProgressStyle::with_template("[{bar:30}] step {pos:>4}/{len}  {msg}")
                    .expect("a valid template")
                    .progress_chars("#> "),
            )
        } else {
            ProgressBar::hidden()
        };
        bar.set_position(first as u64);
        Self { bar, steps }
    }

    fn step(&self, step: usize, message: String) {
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

/// The group's configuration for a job on `ranks` ranks.
fn ep_config(job: &Job, ranks: usize, sp: usize) -> EpConfig {
    let config = match job {
        Job::Mapping(c) => EpConfig::new(ranks, c.num_experts, c.top_k, c.hidden)
            .with_max_tokens_per_rank(c.global_tokens)
            // One row count for every local expert: the MoE layer runs its experts
            // on the dispatched rows in place.
            .with_uniform_expert_rows(true),
        Job::Text { run, .. } => run.ep_config(ranks),
    };
    config.with_sp_size(sp)
}

/// Ends the program with rank 0's error.
fn fail(error: impl std::fmt::Display) -> ! {
    eprintln!("train_moe: rank 0 failed: {error}");
    std::process::exit(1);
}

fn run<B: AutodiffBackend + ExpertParallelBackend>(
    job: &Job,
    o: &Options,
    device: fn(usize) -> B::Device,
) {
    let (ranks, transport) = (o.ranks, o.transport());
    let ep = ep_config(job, ranks, o.sp);
    let start = Instant::now();
    // The transports' finer options (ranks per simulated node, the route inside a
    // process, NCCL's loopback) come from the environment, which this program
    // reads on purpose; see `RunOptions::from_env`.
    let options = RunOptions::from_env()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_timeout(Duration::from_secs(300));
    match job {
        Job::Mapping(config) => {
            run_mapping::<B>(config, o.steps(), &ep, transport, &options, device)
        }
        Job::Text {
            run: text_run,
            corpus,
            first,
        } => {
            let first = *first;
            let tokens = text_run.tokens_per_step();
            let progress = Progress::new(first, text_run.steps);
            let results = run_ranks(
                transport,
                &options,
                &ep,
                |_, ordinal| device(ordinal),
                |group: EpGroup<B>| {
                    let rank = group.rank();
                    Ok(train_text(text_run, corpus, &group, |s| {
                        if rank == 0 {
                            let rate =
                                ((s.step - first) * tokens) as f64 / start.elapsed().as_secs_f64();
                            let held_out = s
                                .held_out
                                .map_or_else(String::new, |l| format!("  held-out {l:.4}"));
                            progress.step(
                                s.step,
                                format!("loss {:.4}{held_out}  {rate:>8.0} tokens/s", s.loss),
                            );
                        }
                    }))
                },
            );
            progress.finish();
            let outcome = match results.and_then(|r| r.into_iter().next().unwrap()) {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => fail(e),
                Err(e) => fail(e),
            };
            report_text(
                text_run,
                corpus,
                &outcome,
                first,
                start.elapsed().as_secs_f64(),
                ranks,
            );
        }
    }
}

/// What rank 0 prints at the end of a text run.
fn report_text(
    run: &TextRun,
    corpus: &Corpus,
    outcome: &lm_training::TextOutcome,
    first: usize,
    seconds: f64,
    ranks: usize,
) {
    let steps = &outcome.steps;
    let (Some(head), Some(last)) = (steps.first(), steps.last()) else {
        return;
    };
    let held_out = last
        .held_out
        .map_or_else(String::new, |l| format!(", held-out {l:.4}"));
    println!(
        "trained steps {}..{} on {ranks} ranks in {seconds:.1}s: loss {:.4} -> {:.4}{held_out} (unigram baseline {:.4})",
        first + 1,
        last.step,
        head.loss,
        last.loss,
        corpus.unigram_loss()
    );
    let tokens = (steps.len() * run.tokens_per_step()) as f64;
    let flops = 3.0 * run.shape.token_flops() as f64 * tokens;
    println!(
        "{:.0} tokens/s, {:.3} TFLOP/s (the model's products forward and backward, {:.1} GFLOP a step over all ranks)",
        tokens / seconds,
        flops / seconds / 1e12,
        flops / steps.len() as f64 / 1e9
    );
    if let Some(dir) = &run.save {
        println!(
            "saved to {} (loss curve: {})",
            dir.display(),
            dir.join("loss.svg").display()
        );
    }
    println!("expert loads at the last step (token-expert pairs per expert, whole group):");
    let local = run.shape.num_experts / ranks;
    for (layer, loads) in last.loads.iter().enumerate() {
        let per_rank: Vec<usize> = loads.chunks(local).map(|c| c.iter().sum()).collect();
        println!("  block {layer}: per expert {loads:?}, per rank {per_rank:?}");
    }
    if let Some(sample) = &outcome.sample {
        println!("sample (temperature 0.8):\n{sample}");
    }
}

fn run_mapping<B: AutodiffBackend + ExpertParallelBackend>(
    config: &TrainConfig,
    steps: usize,
    ep: &EpConfig,
    transport: Transport,
    options: &RunOptions,
    device: fn(usize) -> B::Device,
) {
    let ranks = ep.world_size;
    let start = Instant::now();
    let progress = Progress::new(0, steps);
    let results = run_ranks(
        transport,
        options,
        ep,
        |_, ordinal| device(ordinal),
        |group: EpGroup<B>| {
            let rank = group.rank();
            train(config, &group, steps, |r| {
                if rank == 0 {
                    let seen = (r.step + 1) * config.global_tokens;
                    let rate = seen as f64 / start.elapsed().as_secs_f64();
                    progress.step(
                        r.step + 1,
                        format!("loss {:.4}  {rate:>8.0} tokens/s", r.loss),
                    );
                }
            })
        },
    );
    progress.finish();
    let history = match results.and_then(|r| r.into_iter().next().unwrap()) {
        Ok(h) => h,
        Err(e) => fail(e),
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
    let job = o.job().unwrap_or_else(|message| {
        Options::command()
            .error(ErrorKind::ValueValidation, message)
            .exit()
    });
    // NVRTC's compilation is what the cache saves; the CPU compiles no kernels.
    if o.on_cuda() && !o.no_kernel_cache {
        keep_compiled_kernels();
    }
    let (ranks, transport, backend) = (o.ranks, o.transport(), name_of(o.backend));
    match &job {
        Job::Mapping(config) => println!(
            "train_moe --task mapping: {} layers, {} experts (top-{}), hidden {}, {} tokens per step, {ranks} ranks on {backend}, {transport} transport",
            config.layers, config.num_experts, config.top_k, config.hidden, config.global_tokens,
        ),
        Job::Text { run, corpus, .. } => {
            let s = &run.shape;
            let shared = if s.shared_expert { " and a shared expert" } else { "" };
            println!(
                "train_moe: a transformer of {} blocks (hidden {}, {} heads, {} experts of width {}, top-{}{shared}), {} tokens per step in sequences of {}, {ranks} ranks on {backend}, {transport} transport",
                s.layers, s.hidden, s.heads, s.num_experts, s.ffn_hidden, s.top_k, run.tokens_per_step(), s.sequence,
            );
            println!(
                "text: {} bytes to train on, {} held out; the unigram baseline (bytes' frequencies alone) is {:.4} nats per byte",
                corpus.train.len(),
                corpus.held_out.len(),
                corpus.unigram_loss()
            );
        }
    }
    match o.backend {
        BackendName::Ndarray => {
            run::<Autodiff<burn::backend::NdArray<f32>>>(&job, &o, |_| Default::default())
        }
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => run::<Autodiff<Wgpu>>(&job, &o, |_| Default::default()),
        #[cfg(all(feature = "wgpu", feature = "fusion"))]
        BackendName::WgpuFusion => {
            run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(&job, &o, |_| Default::default())
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => run::<Autodiff<Cuda>>(&job, &o, burn::backend::cuda::CudaDevice::new),
        #[cfg(all(feature = "cuda", feature = "fusion"))]
        BackendName::CudaFusion => run::<Autodiff<burn::backend::Cuda<f32, i32>>>(
            &job,
            &o,
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
}
