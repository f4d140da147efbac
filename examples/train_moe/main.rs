//! The main job: trains a small MoE language model on a synthetic task with W
//! simulated ranks (threads) in one process; experts are split over the ranks.
//!
//!     cargo run --release --example train_moe -- --ranks 4 --backend ndarray --steps 300

mod model;

use std::io::Write;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_ep::{run_ranks, EpConfig, EpGroup, ExpertParallelBackend, Transport};
use model::{train, TrainConfig};

/// CubeCL's backends without Burn's fusion (see `--backend`).
#[cfg(feature = "wgpu")]
type Wgpu = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
#[cfg(feature = "cuda")]
type Cuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

const HELP: &str = "train_moe: train a small MoE model with expert parallelism

USAGE: cargo run --release --example train_moe -- [OPTIONS]

OPTIONS:
  --ranks W        simulated ranks (threads sharing the device) [default: 4]
  --backend B      ndarray | wgpu | cuda (cuda needs the `cuda` feature), CubeCL's
                   backends as they are; wgpu-fusion | cuda-fusion: the same under
                   Burn's fusion, as Burn's default features give them [default: ndarray]
  --steps N        optimizer steps [default: 300]
  --sp S           sequence-parallel size (pads the tokens per rank) [default: 1]
  --transport T    local | cuda-peer (rows by device copies; --backend cuda) |
                   nccl | hierarchical (one GPU per rank; --backend cuda) [default: local]
  --size S         small | gpu: the model and batch below, or one whose MoE layers
                   are GPU-sized (hidden 1024, 64 experts of width 1408, top-6,
                   8192 tokens per step) [default: small]
  --hidden H --ffn F --experts E --top-k K --layers L --tokens N --vocab V
                   override one figure of the size (N: tokens per step, all ranks)
  --help           this text

Prints the loss, tokens per second and the model's TFLOP/s (forward and backward
products, per second of the whole run, compilation of the kernels included).";

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
    let timeout = Duration::from_secs(300);
    let results = run_ranks(
        transport,
        &ep,
        timeout,
        |_, ordinal| device(ordinal),
        |group: EpGroup<B>| {
            let rank = group.rank();
            train(config, &group, steps, |r| {
                if rank == 0 {
                    let seen = (r.step + 1) * config.global_tokens;
                    let rate = seen as f64 / start.elapsed().as_secs_f64();
                    let done = (r.step + 1) * 30 / steps;
                    eprint!(
                        "\r[{}{}] step {:>4}/{steps}  loss {:.4}  {:>8.0} tokens/s",
                        "#".repeat(done),
                        " ".repeat(30 - done),
                        r.step + 1,
                        r.loss,
                        rate
                    );
                    let _ = std::io::stderr().flush();
                }
            })
        },
    );
    eprintln!();
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

fn main() {
    let mut ranks = 4;
    let mut backend = "ndarray".to_string();
    let mut steps = 300;
    let mut transport = Transport::Local;
    let mut config = TrainConfig::default();
    let all: Vec<String> = std::env::args().skip(1).collect();
    // The size first, so that the figures given beside it override its own.
    if let Some(i) = all.iter().position(|a| a == "--size") {
        config = match all.get(i + 1).map(String::as_str) {
            Some("small") => TrainConfig::default(),
            Some("gpu") => TrainConfig::gpu(),
            other => {
                eprintln!("train_moe: --size {}: small or gpu", other.unwrap_or(""));
                std::process::exit(2)
            }
        }
    }
    let mut args = all.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{HELP}");
            return;
        }
        let value = args.next().unwrap_or_else(|| {
            eprintln!("train_moe: {flag} needs a value (see --help)");
            std::process::exit(2)
        });
        let number = || {
            value.parse::<usize>().unwrap_or_else(|e| {
                eprintln!("train_moe: {flag} {value}: {e}");
                std::process::exit(2)
            })
        };
        match flag.as_str() {
            "--size" => {}
            "--hidden" => config.hidden = number(),
            "--ffn" => config.ffn_hidden = number(),
            "--experts" => config.num_experts = number(),
            "--top-k" => config.top_k = number(),
            "--layers" => config.layers = number(),
            "--tokens" => config.global_tokens = number(),
            "--vocab" => config.vocab = number(),
            "--ranks" => ranks = number(),
            "--steps" => steps = number().max(1),
            "--sp" => config.sp_size = number(),
            "--backend" => backend = value,
            "--transport" => {
                transport = value.parse().unwrap_or_else(|e| {
                    eprintln!("train_moe: {e}");
                    std::process::exit(2)
                })
            }
            other => {
                eprintln!("train_moe: unknown option {other} (see --help)");
                std::process::exit(2)
            }
        }
    }
    if ranks == 0 || config.num_experts % ranks != 0 || config.global_tokens % ranks != 0 {
        eprintln!(
            "train_moe: --ranks must divide {} experts and {} tokens",
            config.num_experts, config.global_tokens
        );
        std::process::exit(2);
    }
    println!(
        "train_moe: {} layers, {} experts (top-{}), hidden {}, {} tokens per step, {ranks} ranks on {backend}, {transport} transport",
        config.layers, config.num_experts, config.top_k, config.hidden, config.global_tokens
    );
    match backend.as_str() {
        "ndarray" => {
            run::<Autodiff<burn::backend::NdArray<f32>>>(&config, ranks, steps, transport, |_| {
                Default::default()
            })
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<Autodiff<Wgpu>>(&config, ranks, steps, transport, |_| Default::default()),
        #[cfg(all(feature = "wgpu", feature = "fusion"))]
        "wgpu-fusion" => {
            run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(&config, ranks, steps, transport, |_| {
                Default::default()
            })
        }
        #[cfg(feature = "cuda")]
        "cuda" => run::<Autodiff<Cuda>>(
            &config,
            ranks,
            steps,
            transport,
            burn::backend::cuda::CudaDevice::new,
        ),
        #[cfg(all(feature = "cuda", feature = "fusion"))]
        "cuda-fusion" => run::<Autodiff<burn::backend::Cuda<f32, i32>>>(
            &config,
            ranks,
            steps,
            transport,
            burn::backend::cuda::CudaDevice::new,
        ),
        other => {
            eprintln!("train_moe: backend {other} is not built in (see --help)");
            std::process::exit(2)
        }
    }
}
