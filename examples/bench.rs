//! Times dispatch, cached dispatch and combine (and their backward passes) over
//! ranks that are threads of one process, with the device-synchronised median,
//! min and max of many runs after warm-up.
//!
//!     cargo run --release --example bench -- --help

use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_ep::{run_local, EpConfig, EpGroup, ExpertParallelBackend};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

const HELP: &str = "bench: time burn-ep's dispatch and combine

USAGE: cargo run --release --example bench -- [OPTIONS]

OPTIONS:
  --backend B     ndarray | wgpu | cuda (cuda needs the `cuda` feature) [default: ndarray]
  --ranks W       ranks, as threads sharing the device [default: 2]
  --tokens LIST   tokens per rank, comma-separated [default: 128]
  --hidden H      hidden size [default: 7168, or 256 on ndarray]
  --top-k K       experts per token [default: 8]
  --experts E     experts in all [default: 256]
  --dtype D       bf16 | f16 | f32 payload [default: bf16, f32 on ndarray]
  --routing R     uniform | skewed | sentinel (uniform with 10% -1 slots) [default: uniform]
  --alignment A   expert alignment [default: 1]
  --warmup N      untimed runs first [default: 3]
  --iters N       timed runs [default: 20]
  --json PATH     also write the results as JSON
  --help          this text

Times are taken on rank 0 between device synchronisations, after a barrier of all
ranks. Bytes are DeepEP's convention: every row received, times H, times the
element size, over the time. The transport is `local` (host copies between rank
threads), so these figures measure it, not a GPU-to-GPU link.";

#[derive(Debug, Clone)]
struct Options {
    backend: String,
    ranks: usize,
    tokens: Vec<usize>,
    hidden: Option<usize>,
    top_k: usize,
    experts: usize,
    dtype: Option<String>,
    routing: String,
    alignment: usize,
    warmup: usize,
    iters: usize,
    json: Option<String>,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        backend: "ndarray".into(),
        ranks: 2,
        tokens: vec![128],
        hidden: None,
        top_k: 8,
        experts: 256,
        dtype: None,
        routing: "uniform".into(),
        alignment: 1,
        warmup: 3,
        iters: 20,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{HELP}");
            std::process::exit(0);
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--backend" => o.backend = value,
            "--ranks" => o.ranks = num(&value)?,
            "--tokens" => o.tokens = value.split(',').map(num).collect::<Result<_, _>>()?,
            "--hidden" => o.hidden = Some(num(&value)?),
            "--top-k" => o.top_k = num(&value)?,
            "--experts" => o.experts = num(&value)?,
            "--dtype" => o.dtype = Some(value),
            "--routing" => o.routing = value,
            "--alignment" => o.alignment = num(&value)?,
            "--warmup" => o.warmup = num(&value)?,
            "--iters" => o.iters = num(&value)?,
            "--json" => o.json = Some(value),
            other => return Err(format!("unknown option {other} (see --help)")),
        }
    }
    Ok(o)
}

#[derive(Debug, Clone)]
struct Phase {
    name: &'static str,
    times: Vec<Duration>,
    bytes: usize,
}

impl Phase {
    fn stats(&self) -> (f64, f64, f64) {
        let mut us: Vec<f64> = self.times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (us[us.len() / 2], us[0], us[us.len() - 1])
    }
}

fn run<B: ExpertParallelBackend + AutodiffBackend>(
    o: &Options,
    tokens: usize,
    device: B::Device,
    dtype: DType,
    hidden: usize,
) -> Vec<Phase> {
    let config = EpConfig::new(o.ranks, o.experts, o.top_k, hidden)
        .with_expert_alignment(o.alignment)
        .with_max_tokens_per_rank(tokens.max(1));
    let (pattern, sentinels) = match o.routing.as_str() {
        "skewed" => (RoutingPattern::Skewed, SentinelPattern::None),
        "sentinel" => (RoutingPattern::Uniform, SentinelPattern::RandomTenth),
        _ => (RoutingPattern::Uniform, SentinelPattern::None),
    };
    let batches = synthetic_batches(&config, tokens, pattern, sentinels, 1);
    let elem = dtype.size();
    let results = run_local(o.ranks, Duration::from_secs(600), |comm| {
        let group = EpGroup::<B>::new(config.clone(), comm, device.clone())?;
        let b = &batches[group.rank()];
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(b.x.clone(), [b.tokens, hidden]),
            (&device, dtype),
        );
        let w = Tensor::<B, 2>::from_data(
            TensorData::new(b.topk_weights.clone(), [b.tokens, o.top_k]),
            &device,
        );
        let idx = Tensor::<B, 2, Int>::from_data(
            TensorData::new(b.topk_idx.clone(), [b.tokens, o.top_k]),
            &device,
        );
        let barrier = || group_barrier(&group);
        let timed = |f: &mut dyn FnMut()| -> Vec<Duration> {
            let mut times = Vec::new();
            for i in 0..o.warmup + o.iters {
                barrier();
                B::sync(&device).unwrap();
                let start = Instant::now();
                f();
                B::sync(&device).unwrap();
                if i >= o.warmup {
                    times.push(start.elapsed());
                }
            }
            times
        };
        let d = group.dispatch(x.clone(), idx.clone(), w.clone())?;
        let received = d.routing.received_rows();
        let y = d.rows.clone();
        let dispatch = timed(&mut || {
            group.dispatch(x.clone(), idx.clone(), w.clone()).unwrap();
        });
        let cached = timed(&mut || {
            group.dispatch_cached(x.clone(), &d.routing).unwrap();
        });
        let combine = timed(&mut || {
            group.combine(y.clone(), &d.routing).unwrap();
        });
        let round_trip = timed(&mut || {
            let xg = x.clone().require_grad();
            let dd = group
                .dispatch(xg.clone(), idx.clone(), w.clone().require_grad())
                .unwrap();
            let out = group.combine(dd.rows, &dd.routing).unwrap();
            let _ = out.sum().backward();
        });
        let bytes = received * hidden * elem;
        Ok(vec![
            Phase {
                name: "dispatch",
                times: dispatch,
                bytes,
            },
            Phase {
                name: "cached dispatch",
                times: cached,
                bytes,
            },
            Phase {
                name: "combine",
                times: combine,
                bytes,
            },
            Phase {
                name: "dispatch+combine fwd+bwd",
                times: round_trip,
                bytes: 4 * bytes,
            },
        ])
    });
    results.into_iter().next().unwrap().expect("rank 0 failed")
}

fn group_barrier<B: ExpertParallelBackend>(group: &EpGroup<B>) {
    group.barrier().expect("barrier failed");
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let cpu = o.backend == "ndarray";
    let hidden = o.hidden.unwrap_or(if cpu { 256 } else { 7168 });
    let dtype = match o
        .dtype
        .as_deref()
        .unwrap_or(if cpu { "f32" } else { "bf16" })
    {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    println!(
        "burn-ep bench: backend {}, {} ranks sharing one device, H={hidden}, K={}, E={}, {dtype:?}, routing {}, local transport",
        o.backend, o.ranks, o.top_k, o.experts, o.routing
    );
    println!(
        "{:>6}  {:<26} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "T", "phase", "median µs", "min µs", "max µs", "MB recv", "GB/s"
    );
    let mut json = Vec::new();
    for (n, &tokens) in o.tokens.iter().enumerate() {
        eprintln!("[{}/{}] T={tokens} ...", n + 1, o.tokens.len());
        let phases = match o.backend.as_str() {
            "ndarray" => run::<Autodiff<burn::backend::NdArray<f32>>>(
                &o,
                tokens,
                Default::default(),
                dtype,
                hidden,
            ),
            #[cfg(feature = "wgpu")]
            "wgpu" => run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(
                &o,
                tokens,
                Default::default(),
                dtype,
                hidden,
            ),
            #[cfg(feature = "cuda")]
            "cuda" => run::<Autodiff<burn::backend::Cuda<f32, i32>>>(
                &o,
                tokens,
                Default::default(),
                dtype,
                hidden,
            ),
            other => {
                eprintln!("bench: backend {other} is not built in (see --help)");
                std::process::exit(2);
            }
        };
        for p in &phases {
            let (median, min, max) = p.stats();
            let gbps = p.bytes as f64 / (median * 1e-6) / 1e9;
            println!(
                "{tokens:>6}  {:<26} {median:>12.1} {min:>12.1} {max:>12.1} {:>12.2} {gbps:>10.2}",
                p.name,
                p.bytes as f64 / 1e6
            );
            json.push(format!(
                "{{\"tokens\":{tokens},\"phase\":\"{}\",\"median_us\":{median:.2},\"min_us\":{min:.2},\"max_us\":{max:.2},\"bytes\":{},\"gbps\":{gbps:.3}}}",
                p.name, p.bytes
            ));
        }
    }
    if let Some(path) = &o.json {
        let body = format!(
            "{{\"backend\":\"{}\",\"ranks\":{},\"hidden\":{hidden},\"top_k\":{},\"experts\":{},\"dtype\":\"{dtype:?}\",\"routing\":\"{}\",\"transport\":\"local\",\"results\":[{}]}}\n",
            o.backend, o.ranks, o.top_k, o.experts, o.routing, json.join(",")
        );
        std::fs::write(path, body).expect("writing the JSON file");
    }
}
