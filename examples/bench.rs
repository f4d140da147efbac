//! Times dispatch, cached dispatch and combine (and their backward passes) over
//! ranks that are threads of one process, with the device-synchronised median,
//! min and max of many runs after warm-up.
//!
//!     cargo run --release --example bench -- --help

use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_ep::{
    run_ranks, EpConfig, EpGroup, ExchangeOp, ExchangeTag, ExpertParallelBackend, Transport,
};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

const HELP: &str = "bench: time burn-ep's dispatch and combine

USAGE: cargo run --release --example bench -- [OPTIONS]

OPTIONS:
  --backend B     ndarray | wgpu | cuda (cuda needs the `cuda` feature) [default: ndarray]
  --ranks W       ranks, as threads of this process [default: 2]
  --transport T   local | cuda-peer (device copies; --backend cuda; ranks spread
                  over the GPUs round-robin) | nccl (one GPU per rank) |
                  hierarchical (simulated nodes, see the book) [default: local]
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
element size, over the time. The local transport moves host copies between rank
threads; cuda-peer moves device buffers with the copy engines.";

#[derive(Debug, Clone)]
struct Options {
    backend: String,
    transport: Transport,
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
        transport: Transport::Local,
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
            "--transport" => o.transport = value.parse().map_err(|e| format!("{e}"))?,
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
    device_of: fn(usize) -> B::Device,
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
    let timeout = Duration::from_secs(600);
    let results = run_ranks(
        o.transport,
        &config,
        timeout,
        |_, i| device_of(i),
        |group: EpGroup<B>| {
            let device = group.device().clone();
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
            // The steps of one dispatch, timed alone (each between device
            // synchronisations): where the time of a dispatch goes.
            let plan = d.routing.plan().clone();
            let inner_x = x.clone().into_primitive().tensor();
            let inner_idx = idx.clone().into_primitive();
            let slots = plan.slots.clone();
            let layout = timed(&mut || {
                B::ep_layout(inner_idx.clone(), &config).unwrap();
            });
            let control = timed(&mut || group.barrier().unwrap());
            let sync = timed(&mut || {});
            let packed = || {
                slots
                    .clone()
                    .filter(|_| plan.sent_rows() > 0)
                    .map(|s| B::ep_pack(inner_x.clone(), s, plan.sent_rows(), None).0)
            };
            let pack = timed(&mut || {
                packed();
            });
            let sent = packed();
            let exchange_once = || {
                B::ep_exchange(
                    ExchangeTag::new(plan.handle, ExchangeOp::Rows),
                    sent.clone(),
                    hidden,
                    dtype,
                    &plan.send_counts,
                    &plan.recv_counts,
                    &plan.device,
                    group.exchange(),
                )
                .unwrap()
            };
            let exchange_time = timed(&mut || {
                exchange_once();
            });
            let arrived = exchange_once();
            let expand = timed(&mut || {
                if let (Some(r), Some(p)) = (&arrived, &plan.positions) {
                    B::ep_expand(r.clone(), p.clone(), plan.padded_rows);
                }
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
                step("step: layout (+count read)", layout),
                step("step: control message", control),
                step("step: pack", pack),
                Phase {
                    name: "step: row exchange",
                    times: exchange_time,
                    bytes,
                },
                step("step: expand", expand),
                step("step: device sync alone", sync),
            ])
        },
    );
    results
        .and_then(|r| r.into_iter().next().unwrap())
        .expect("rank 0 failed")
}

/// A step of the dispatch breakdown, which moves no rows of its own.
fn step(name: &'static str, times: Vec<Duration>) -> Phase {
    Phase {
        name,
        times,
        bytes: 0,
    }
}

/// The copy ceiling of the transport, measured in this process: a peer copy from
/// GPU 0 to GPU 1, or a device copy on GPU 0 when there is one GPU.
#[cfg(feature = "cuda")]
fn ceiling(o: &Options) -> Option<(String, f64)> {
    if o.backend != "cuda" {
        return None;
    }
    let devices = ep_mesh::cuda_device_count().ok()?;
    let to = if devices > 1 && o.ranks > 1 { 1 } else { 0 };
    let bytes = 256 << 20;
    match ep_mesh::bandwidth::copy_bandwidth(0, to, bytes, 20) {
        Ok(b) => Some((
            format!(
                "copy GPU0 -> GPU{to}, {} MiB: {:.1} GB/s ({:.1} µs)",
                bytes >> 20,
                b.gbps,
                b.time.as_secs_f64() * 1e6
            ),
            b.gbps,
        )),
        Err(e) => {
            eprintln!("bench: ceiling not measured: {e}");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn ceiling(_o: &Options) -> Option<(String, f64)> {
    None
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
        "burn-ep bench: backend {}, {} ranks, H={hidden}, K={}, E={}, {dtype:?}, routing {}, {} transport",
        o.backend, o.ranks, o.top_k, o.experts, o.routing, o.transport
    );
    let ceiling = ceiling(&o);
    match &ceiling {
        Some((what, _)) => println!("ceiling: {what}"),
        None => println!("ceiling: not measured (CUDA backend only)"),
    }
    println!(
        "{:>6}  {:<28} {:>10} {:>10} {:>10} {:>9} {:>8} {:>9}",
        "T", "phase", "median µs", "min µs", "max µs", "MB recv", "GB/s", "ceiling"
    );
    let mut json = Vec::new();
    for (n, &tokens) in o.tokens.iter().enumerate() {
        eprintln!("[{}/{}] T={tokens} ...", n + 1, o.tokens.len());
        let phases = match o.backend.as_str() {
            "ndarray" => run::<Autodiff<burn::backend::NdArray<f32>>>(
                &o,
                tokens,
                |_| Default::default(),
                dtype,
                hidden,
            ),
            #[cfg(feature = "wgpu")]
            "wgpu" => run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(
                &o,
                tokens,
                |_| Default::default(),
                dtype,
                hidden,
            ),
            #[cfg(feature = "cuda")]
            "cuda" => run::<Autodiff<burn::backend::Cuda<f32, i32>>>(
                &o,
                tokens,
                burn::backend::cuda::CudaDevice::new,
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
            let fraction = ceiling.as_ref().map(|(_, c)| gbps / c);
            let shown = match fraction {
                Some(f) if p.bytes > 0 => format!("{:.1}%", 100.0 * f),
                _ => "-".into(),
            };
            println!(
                "{tokens:>6}  {:<28} {median:>10.1} {min:>10.1} {max:>10.1} {:>9.2} {gbps:>8.2} {shown:>9}",
                p.name,
                p.bytes as f64 / 1e6
            );
            json.push(format!(
                "{{\"tokens\":{tokens},\"phase\":\"{}\",\"median_us\":{median:.2},\"min_us\":{min:.2},\"max_us\":{max:.2},\"bytes\":{},\"gbps\":{gbps:.3},\"ceiling_fraction\":{}}}",
                p.name,
                p.bytes,
                fraction.filter(|_| p.bytes > 0).map_or("null".into(), |f| format!("{f:.4}"))
            ));
        }
    }
    if let Some(path) = &o.json {
        let body = format!(
            "{{\"backend\":\"{}\",\"ranks\":{},\"hidden\":{hidden},\"top_k\":{},\"experts\":{},\"dtype\":\"{dtype:?}\",\"routing\":\"{}\",\"transport\":\"{}\",\"ceiling_gbps\":{},\"results\":[{}]}}\n",
            o.backend, o.ranks, o.top_k, o.experts, o.routing, o.transport,
            ceiling.as_ref().map_or("null".into(), |(_, c)| format!("{c:.2}")),
            json.join(",")
        );
        std::fs::write(path, body).expect("writing the JSON file");
    }
}
