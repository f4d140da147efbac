//! A multi-process group checked against the plain-Rust reference: every process
//! runs its ranks' dispatch, combine and replay for a few steps on the CUDA backend
//! and compares them with `ep_core::reference`, which every process computes for
//! the whole group from the same seeds. Launched in the torchrun convention (see
//! the book's multi-node chapter; `scripts/two_node_nccl.sh` drives it).
//!
//! With `--kill-rank R --kill-step S` the process of rank R exits at step S without
//! a word, as a crashed node would; every other rank must then fail with an
//! `EpError` within the timeout. Exit status: 0 all checks passed, 2 an `EpError`
//! (the expected outcome of a survivor), 1 a wrong result, 64 bad arguments.
//!
//!     RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
//!       cargo run --release --features cuda --example nccl_check -- --steps 5

use std::process::exit;
use std::time::{Duration, Instant};

use burn::backend::cuda::CudaDevice;
use burn::tensor::{Int, Tensor, TensorData};
use burn_ep::{launch, EpConfig, EpResult, RunOptions};
use clap::Parser;
use ep_core::reference;
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

type Cuda = burn::backend::Cuda<f32, i32>;

// Only `at_least_one` is used here; the backend names are bench's and train_moe's.
#[path = "common/cli.rs"]
#[allow(dead_code)]
mod cli;
use cli::at_least_one;

/// nccl_check: a multi-process group checked against the plain-Rust reference.
#[derive(Debug, Parser)]
#[command(name = "nccl_check", after_help = EXIT_STATUS)]
struct Options {
    /// Tokens per rank
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Hidden size
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Experts on each rank
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    experts_per_rank: usize,
    /// Experts per token
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    top_k: usize,
    /// Steps of dispatch, combine and replay
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Seconds a rank waits for its peers
    #[arg(long = "timeout-s", value_name = "SECONDS", default_value_t = 30)]
    timeout_s: u64,
    /// The process of this rank exits without a word at --kill-step, as a crashed
    /// node would; every other rank must then fail with an EpError
    #[arg(long, value_name = "RANK")]
    kill_rank: Option<usize>,
    /// The step at which --kill-rank exits
    #[arg(long, value_name = "STEP", default_value_t = 0, requires = "kill_rank")]
    kill_step: usize,
}

const EXIT_STATUS: &str = "Exit status: 0 all checks passed, 2 an EpError (the expected \
outcome of a survivor), 1 a wrong result, 64 bad arguments.";

impl Options {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    fn kill(&self) -> Option<(usize, usize)> {
        self.kill_rank.map(|rank| (rank, self.kill_step))
    }
}

/// The options, or exit: 64 for bad arguments, so that they are not taken for an
/// `EpError` (2) or a wrong result (1); 0 after `--help`.
fn options() -> Options {
    Options::try_parse().unwrap_or_else(|e| {
        if e.use_stderr() {
            let _ = e.print();
            exit(64)
        }
        e.exit()
    })
}

/// The stand-in expert: rows of global expert `e` scaled by `1 + e / 4`.
fn scale(expert: usize) -> f32 {
    1.0 + expert as f32 * 0.25
}

fn host(t: Tensor<Cuda, 2>) -> Vec<f32> {
    if t.dims()[0] == 0 {
        return Vec::new();
    }
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// One step on one rank: the largest difference from the reference.
fn step(
    group: &burn_ep::EpGroup<Cuda>,
    config: &EpConfig,
    seed: u64,
    device: &CudaDevice,
) -> EpResult<f32> {
    let (rank, k, h) = (group.rank(), config.top_k, config.hidden_size);
    let local = config.experts_per_rank();
    let batches = synthetic_batches(
        config,
        config.max_tokens_per_rank,
        RoutingPattern::Skewed,
        SentinelPattern::RandomTenth,
        seed,
    );
    let b = &batches[rank];
    let x = Tensor::<Cuda, 2>::from_data(TensorData::new(b.x.clone(), [b.tokens, h]), device);
    let idx = Tensor::<Cuda, 2, Int>::from_data(
        TensorData::new(b.topk_idx.clone(), [b.tokens, k]),
        device,
    );
    let w = Tensor::<Cuda, 2>::from_data(
        TensorData::new(b.topk_weights.clone(), [b.tokens, k]),
        device,
    );
    let d = group.dispatch(x.clone(), idx, w)?;
    let offsets = d.routing.expert_offsets().to_vec();
    let scales: Vec<f32> = offsets
        .windows(2)
        .enumerate()
        .flat_map(|(j, o)| std::iter::repeat_n(scale(rank * local + j), o[1] - o[0]))
        .collect();
    let n = scales.len();
    let y = if n == 0 {
        d.rows.clone()
    } else {
        d.rows.clone() * Tensor::<Cuda, 2>::from_data(TensorData::new(scales, [n, 1]), device)
    };
    let combined = group.combine(y, &d.routing)?;
    let replayed = group.dispatch_cached(x * 2.0, &d.routing)?;

    // The reference for the whole group, computed here.
    let want = reference::dispatch(config, &batches)?;
    let outputs: Vec<Vec<f32>> = want
        .iter()
        .enumerate()
        .map(|(r, e)| {
            let mut rows = e.rows.clone();
            for (row, origin) in e.routing.rows.iter().enumerate() {
                if let Some((src, token, slot)) = origin {
                    let expert = batches[*src].topk_idx[token * k + slot] as usize;
                    debug_assert_eq!(expert / local, r);
                    for v in &mut rows[row * h..(row + 1) * h] {
                        *v *= scale(expert);
                    }
                }
            }
            rows
        })
        .collect();
    let routings: Vec<_> = want.iter().map(|e| e.routing.clone()).collect();
    let want_combined = reference::combine(config, &batches, &routings, &outputs);
    let doubled: Vec<Vec<f32>> = batches
        .iter()
        .map(|b| b.x.iter().map(|v| v * 2.0).collect())
        .collect();
    let xs: Vec<&[f32]> = doubled.iter().map(Vec::as_slice).collect();
    let want_replayed = reference::dispatch_cached(&routings, &xs, h);

    let exact = host(d.rows) == want[rank].rows
        && d.expert_counts == want[rank].routing.expert_counts
        && host(replayed) == want_replayed[rank];
    if !exact {
        return Ok(f32::INFINITY);
    }
    Ok(host(combined)
        .iter()
        .zip(&want_combined[rank])
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, f32::max))
}

fn main() {
    let o = options();
    let world =
        match ep_mesh::Launch::from_env(o.timeout(), ep_mesh::cuda_device_count().unwrap_or(1)) {
            Ok(launch) => launch.world_size(),
            Err(e) => {
                eprintln!("nccl_check: {e}");
                exit(2)
            }
        };
    let config = EpConfig::new(world, world * o.experts_per_rank, o.top_k, o.hidden)
        .with_max_tokens_per_rank(o.tokens);
    let start = Instant::now();
    // This program lets its environment set the transport's options, on purpose
    // (BURN_EP_INTRANODE, BURN_EP_NCCL_LOOPBACK: see the book's multinode chapter).
    let options = match RunOptions::from_env() {
        Ok(options) => options.with_timeout(o.timeout()),
        Err(e) => {
            eprintln!("nccl_check: {e}");
            exit(2)
        }
    };
    let results = launch::<Cuda, _, _, _>(
        &options,
        &config,
        |_, d| CudaDevice::new(d),
        |group| {
            let device = group.device().clone();
            let rank = group.rank();
            let mut worst = 0.0f32;
            for s in 0..o.steps {
                if o.kill() == Some((rank, s)) {
                    println!("rank {rank}: exiting at step {s} (--kill-rank)");
                    exit(9);
                }
                let err = step(&group, &config, 1000 + s as u64, &device)?;
                println!("rank {rank}: step {s}: largest relative combine error {err:.2e}");
                worst = worst.max(err);
            }
            Ok(worst)
        },
    );
    let elapsed = start.elapsed().as_secs_f32();
    let results = match results {
        Ok(results) => results,
        Err(e) => {
            println!("nccl_check: error after {elapsed:.1} s: {e}");
            exit(2)
        }
    };
    let (mut wrong, mut failed) = (false, false);
    for result in results {
        match result {
            Ok(worst) if worst <= 1e-5 => {}
            Ok(worst) => {
                println!("nccl_check: WRONG result (error {worst:.2e})");
                wrong = true;
            }
            Err(e) => {
                println!("nccl_check: error after {elapsed:.1} s: {e}");
                failed = true;
            }
        }
    }
    let status = if wrong {
        1
    } else if failed {
        2
    } else {
        0
    };
    if status == 0 {
        println!(
            "nccl_check: PASS ({world} ranks, {} steps, {elapsed:.1} s)",
            o.steps
        );
    }
    exit(status)
}
