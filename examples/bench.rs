//! Times dispatch, cached dispatch and combine (and their backward passes) over
//! ranks that are threads of one process. Every rank times every run between
//! device synchronisations; a run's time is the slowest rank's. Prints p10, median
//! and p90, what each operation made (host synchronisations, control messages,
//! row exchanges, burn-ep's kernel launches) and, on CUDA, its HBM floor.
//!
//!     cargo run --release --example bench -- --help

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use burn::backend::Autodiff;
use burn::module::Param;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_ep::counters::{self, Counts};
use burn_ep::moe::{MoeConfig, MoeLayer};
use burn_ep::steps::{ExchangeOp, ExchangeTag};
use burn_ep::{
    run_ranks, EpConfig, EpGroup, EpResult, ExpertParallelBackend, Routing, RunOptions, Transport,
};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

#[path = "common/cli.rs"]
mod cli;
use cli::{at_least_one, name_of, refuse_unbuilt, BackendName};

/// CubeCL's backends without Burn's fusion (which `burn::backend::Wgpu` and `Cuda`
/// add where Burn's `fusion` feature is on): burn-ep's operations hand each tensor
/// to these anyway, and the hand-over costs time.
#[cfg(feature = "wgpu")]
type Wgpu = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
#[cfg(feature = "cuda")]
type Cuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Notes printed after the options in `--help`.
const NOTES: &str = "Every rank times every run: device sync, barrier of all ranks, clock, the
operation, device sync, clock. A run's time is the slowest rank's; p10, median and
p90 are over the runs. Counts are per rank and run (the most of any rank): host
synchronisations, control messages, row exchanges, burn-ep's kernel launches, and
the MB a device transport sent (a rank's own rows never cross when its kernels place
them). GB/s is DeepEP's convention: every row received, times H, times the element size,
over the median. The HBM floor (CUDA) is the fewest bytes the operation must read
and write on the busiest GPU (the expert-major layout: sent rows read, padded rows
written; combine: padded rows read, tokens written; rank-major: received rows in
place of padded rows), over twice the device-copy
rate measured in the same run (a copy reads and writes each byte); `x floor` is
the median over it. The local transport moves host copies between rank threads;
cuda-peer moves device buffers with the copy engines.";

/// bench: time burn-ep's dispatch and combine.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench", after_help = NOTES)]
struct Options {
    /// CubeCL's backends as they are, or under Burn's fusion (`*-fusion`, as Burn's
    /// default features give them); cuda needs the `cuda` feature
    #[arg(long, value_enum, default_value_t = BackendName::Ndarray)]
    backend: BackendName,
    /// local | cuda-peer (device copies; --backend cuda; ranks spread over the GPUs
    /// round-robin) | nccl (one GPU per rank) | hierarchical (simulated nodes, see
    /// the book)
    #[arg(long, default_value = "local")]
    transport: Transport,
    /// Ranks, as threads of this process
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    ranks: usize,
    /// Tokens per rank, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "128")]
    tokens: Vec<usize>,
    /// Hidden size [default: 7168, or 256 on ndarray]
    #[arg(long)]
    hidden: Option<usize>,
    /// Experts per token
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    top_k: usize,
    /// Experts in all
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    experts: usize,
    /// Payload type [default: bf16, f32 on ndarray]
    #[arg(long, value_enum)]
    dtype: Option<PayloadType>,
    /// uniform | skewed (Zipf) | sentinel (uniform with 10% -1 slots)
    #[arg(long, value_enum, default_value_t = RoutingName::Uniform)]
    routing: RoutingName,
    /// Expert alignment
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    alignment: usize,
    /// Each local expert's group padded to the alignment, or all to one row count
    /// (EpConfig's uniform_expert_rows, on which the MoE layer runs its experts in
    /// place)
    #[arg(long, value_enum, default_value_t = Padding::Aligned)]
    padding: Padding,
    /// Also time burn_ep::moe::MoeLayer (router, dispatch, SwiGLU experts of inner
    /// width F, combine), forward and forward+backward [default: off]
    #[arg(long, value_name = "F")]
    ffn: Option<usize>,
    /// Untimed runs first
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed runs
    #[arg(long, default_value_t = 50, value_parser = at_least_one)]
    iters: usize,
    /// Also write the results as JSON
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
}

impl Options {
    fn uniform_expert_rows(&self) -> bool {
        self.padding == Padding::Uniform
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PayloadType {
    Bf16,
    F16,
    F32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoutingName {
    Uniform,
    Skewed,
    Sentinel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Padding {
    Aligned,
    Uniform,
}

#[derive(Debug, Clone)]
struct Phase {
    name: &'static str,
    /// One per timed run.
    times: Vec<Duration>,
    /// Bytes received (DeepEP's convention), for GB/s.
    bytes: usize,
    /// The fewest bytes of HBM traffic the operation needs on this rank (0: none
    /// stated, for the steps of the breakdown).
    floor_bytes: usize,
    /// What one run made on this rank.
    counts: Counts,
    /// Matrix-product flops of one run on this rank (the MoE layer's experts), for
    /// TFLOP/s; 0 elsewhere.
    flops: usize,
}

impl Phase {
    /// p10, median and p90 in µs.
    fn stats(&self) -> (f64, f64, f64) {
        let mut us: Vec<f64> = self.times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
        (at(0.1), at(0.5), at(0.9))
    }

    /// The ranks' phases as one: each run's slowest rank, the most counts of any
    /// rank, and the floor of the busiest GPU (ranks sharing one GPU add up).
    fn across_ranks(ranks: &[Phase], shared_gpu: bool) -> Phase {
        let first = &ranks[0];
        let max_counts = |f: fn(&Counts) -> u64| ranks.iter().map(|p| f(&p.counts)).max().unwrap();
        let floors = ranks.iter().map(|p| p.floor_bytes);
        Phase {
            name: first.name,
            times: (0..first.times.len())
                .map(|i| ranks.iter().map(|p| p.times[i]).max().unwrap())
                .collect(),
            bytes: first.bytes,
            floor_bytes: if shared_gpu {
                floors.sum()
            } else {
                floors.max().unwrap()
            },
            counts: Counts {
                host_syncs: max_counts(|c| c.host_syncs),
                control_messages: max_counts(|c| c.control_messages),
                exchanges: max_counts(|c| c.exchanges),
                kernel_launches: max_counts(|c| c.kernel_launches),
                sent_bytes: max_counts(|c| c.sent_bytes),
            },
            flops: first.flops,
        }
    }
}

fn run<B: ExpertParallelBackend + AutodiffBackend>(
    o: &Options,
    tokens: usize,
    device_of: fn(usize) -> B::Device,
    dtype: DType,
    hidden: usize,
    shared_gpu: bool,
) -> Vec<Phase> {
    let config = EpConfig::new(o.ranks, o.experts, o.top_k, hidden)
        .with_expert_alignment(o.alignment)
        .with_uniform_expert_rows(o.uniform_expert_rows())
        .with_max_tokens_per_rank(tokens.max(1));
    let (pattern, sentinels) = match o.routing {
        RoutingName::Skewed => (RoutingPattern::Skewed, SentinelPattern::None),
        RoutingName::Sentinel => (RoutingPattern::Uniform, SentinelPattern::RandomTenth),
        RoutingName::Uniform => (RoutingPattern::Uniform, SentinelPattern::None),
    };
    let batches = synthetic_batches(&config, tokens, pattern, sentinels, 1);
    let elem = dtype.size();
    // The transports' finer options come from the environment, read on purpose
    // (`RunOptions::from_env`).
    let options = RunOptions::from_env()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_timeout(Duration::from_secs(600));
    let results = run_ranks(
        o.transport,
        &options,
        &config,
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
            // Times and the counts of the last run (the bench's own barrier and
            // syncs are outside the counted span).
            let timed = |f: &mut dyn FnMut()| -> (Vec<Duration>, Counts) {
                let mut times = Vec::new();
                let mut counts = Counts::default();
                for i in 0..o.warmup + o.iters {
                    B::sync(&device).unwrap();
                    barrier();
                    let before = counters::snapshot();
                    let start = Instant::now();
                    f();
                    counts = counters::snapshot() - before;
                    B::sync(&device).unwrap();
                    if i >= o.warmup {
                        times.push(start.elapsed());
                    }
                }
                (times, counts)
            };
            // The four timed operations of one layout, `dispatch` being its
            // recording dispatch: dispatch, replay, combine, and a dispatch +
            // combine forward and backward. The backward is seeded with ones of the
            // output's shape, the gradient of `out.sum()` (Burn 0.21's sum of a
            // whole [4096, 7168] bf16 tensor runs on 4 cubes, about 1 ms on an H100
            // with its backward, and none of it is burn-ep's). Also returns the
            // routing of an untimed first dispatch.
            type Dispatch<'a, B> =
                dyn Fn(Tensor<B, 2>, Tensor<B, 2>) -> EpResult<(Tensor<B, 2>, Routing<B>)> + 'a;
            let layout_runs = |dispatch: &Dispatch<B>| -> EpResult<_> {
                let (rows, routing) = dispatch(x.clone(), w.clone())?;
                let runs = [
                    timed(&mut || {
                        dispatch(x.clone(), w.clone()).unwrap();
                    }),
                    timed(&mut || {
                        group.dispatch_cached(x.clone(), &routing).unwrap();
                    }),
                    timed(&mut || {
                        group.combine(rows.clone(), &routing).unwrap();
                    }),
                    timed(&mut || {
                        let (rows, routing) =
                            dispatch(x.clone().require_grad(), w.clone().require_grad()).unwrap();
                        let _ = group.combine(rows, &routing).unwrap().backward();
                    }),
                ];
                Ok((runs, routing))
            };
            let (expert_major, routing) = layout_runs(&|x, w| {
                let d = group.dispatch(x, idx.clone(), w)?;
                Ok((d.rows, d.routing))
            })?;
            // The rank-major layout: each received token once, no expand or reduce.
            let (rank_major, _) = layout_runs(&|x, w| {
                let d = group.dispatch_rank_major(x, idx.clone(), w)?;
                Ok((d.rows, d.routing))
            })?;
            let received = routing.received_rows();
            // The whole MoE layer, when asked for.
            let layer_phases = match o.ffn {
                Some(ffn) => {
                    let layer = moe_layer::<B>(o, hidden, ffn, group.rank(), &device, dtype);
                    let forward = timed(&mut || {
                        layer.forward(x.clone(), &group).unwrap();
                    });
                    let backward = timed(&mut || {
                        let out = layer.forward(x.clone().require_grad(), &group).unwrap();
                        let _ = out.out.backward();
                    });
                    let flops = moe_flops(o, tokens, hidden, ffn);
                    // The forward's parts, each timed alone: where its time goes.
                    let routed = layer.router.forward(x.clone());
                    let d = group
                        .dispatch(
                            x.clone(),
                            routed.topk_idx.clone(),
                            routed.topk_weights.clone(),
                        )
                        .unwrap();
                    let offsets = d.routing.expert_offsets().to_vec();
                    let y = layer.experts.forward(d.rows.clone(), &offsets);
                    let router = timed(&mut || {
                        layer.router.forward(x.clone());
                    });
                    let dispatch = timed(&mut || {
                        group
                            .dispatch(
                                x.clone(),
                                routed.topk_idx.clone(),
                                routed.topk_weights.clone(),
                            )
                            .unwrap();
                    });
                    let experts = timed(&mut || {
                        layer.experts.forward(d.rows.clone(), &offsets);
                    });
                    let combine = timed(&mut || {
                        group.combine(y.clone(), &d.routing).unwrap();
                    });
                    vec![
                        ("moe layer forward", forward, flops),
                        ("moe layer fwd+bwd", backward, 3 * flops),
                        ("moe layer: router", router, 0),
                        ("moe layer: dispatch", dispatch, 0),
                        ("moe layer: experts", experts, flops),
                        ("moe layer: combine", combine, 0),
                    ]
                }
                None => Vec::new(),
            };
            // The steps of one dispatch, timed alone (each between device
            // synchronisations): where the time of a dispatch goes.
            let plan = routing.plan().clone();
            let inner_x = x.clone().into_primitive().tensor();
            let inner_idx = idx.clone().into_primitive();
            let layout = timed(&mut || {
                B::ep_layout(inner_idx.clone(), &config).unwrap();
            });
            let control = timed(&mut || group.barrier().unwrap());
            let sync = timed(&mut || {});
            let packed = || {
                plan.send_slots()
                    .map(|s| B::ep_pack(inner_x.clone(), s.clone(), plan.sent_rows(), None).0)
            };
            let pack = timed(&mut || {
                packed();
            });
            // Eight packs with no synchronisation between: what a launch costs the
            // host when nothing waits on the device.
            let packs = timed(&mut || {
                for _ in 0..8 {
                    packed();
                }
            });
            // The same for eight of Burn's own element-wise launches (`x + 1`, not
            // tracked): what any CubeCL launch costs, next to burn-ep's.
            let adds = timed(&mut || {
                for _ in 0..8 {
                    let _ = x.clone().add_scalar(1.0);
                }
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
                    B::ep_expand(r.clone(), p.clone(), plan.padded_rows, &plan.pads);
                }
            });
            let bytes = received * hidden * elem;
            // Expert-major dispatch: each sent row read once, each padded row
            // written once; combine: each padded row read once, each token written.
            let row = hidden * elem;
            let dispatch_floor = (plan.sent_rows() + plan.padded_rows) * row;
            let combine_floor = (plan.padded_rows + tokens) * row;
            // Rank-major: each sent row read, each received row written; combine:
            // each received row read, each token written.
            let rank_major_floor = (plan.sent_rows() + received) * row;
            let rank_major_combine_floor = (received + tokens) * row;
            let phase = |name, (times, counts), bytes, floor_bytes| Phase {
                name,
                times,
                bytes,
                floor_bytes,
                counts,
                flops: 0,
            };
            // The four operations of one layout, with their floors.
            let layout_phases = |names: [&'static str; 4], runs, floor, combine_floor| {
                let [dispatch, cached, combine, round_trip] = runs;
                [
                    phase(names[0], dispatch, bytes, floor),
                    phase(names[1], cached, bytes, floor),
                    phase(names[2], combine, bytes, combine_floor),
                    phase(names[3], round_trip, 4 * bytes, 2 * (floor + combine_floor)),
                ]
            };
            let expert_major = layout_phases(
                [
                    "dispatch",
                    "cached dispatch",
                    "combine",
                    "dispatch+combine fwd+bwd",
                ],
                expert_major,
                dispatch_floor,
                combine_floor,
            );
            let rank_major = layout_phases(
                [
                    "rank-major dispatch",
                    "rank-major cached dispatch",
                    "rank-major combine",
                    "rank-major fwd+bwd",
                ],
                rank_major,
                rank_major_floor,
                rank_major_combine_floor,
            );
            Ok(expert_major
                .into_iter()
                .chain(rank_major)
                .chain([
                    phase("step: layout (+count read)", layout, 0, 0),
                    phase("step: control message", control, 0, 0),
                    phase("step: pack", pack, 0, 0),
                    phase("step: 8 packs, no sync between", packs, 0, 0),
                    phase("step: 8 Burn adds, no sync between", adds, 0, 0),
                    phase("step: row exchange", exchange_time, bytes, 0),
                    phase("step: expand", expand, 0, 0),
                    phase("step: device sync alone", sync, 0, 0),
                ])
                .chain(layer_phases.into_iter().map(|(name, timed, flops)| Phase {
                    flops,
                    ..phase(name, timed, 0, 0)
                }))
                .collect())
        },
    );
    let ranks: Vec<Vec<Phase>> = results
        .expect("the ranks did not start")
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank} failed: {e}")))
        .collect();
    (0..ranks[0].len())
        .map(|i| {
            let phases: Vec<Phase> = ranks.iter().map(|r| r[i].clone()).collect();
            Phase::across_ranks(&phases, shared_gpu)
        })
        .collect()
}

/// Copy rates measured in this process, in GB/s of bytes copied.
#[derive(Debug, Default)]
struct Rates {
    /// A device copy on GPU 0 (each byte read and written): the HBM rate.
    device: Option<f64>,
    /// A peer copy GPU 0 -> GPU 1, where there are two GPUs and two ranks.
    peer: Option<f64>,
    gpus: usize,
}

impl Rates {
    /// The transport's copy ceiling: the peer rate across GPUs, else the device rate.
    fn ceiling(&self) -> Option<f64> {
        self.peer.or(self.device)
    }
}

#[cfg(feature = "cuda")]
fn rates(o: &Options) -> Rates {
    if !matches!(o.backend, BackendName::Cuda | BackendName::CudaFusion) {
        return Rates::default();
    }
    let gpus = ep_mesh::cuda_device_count().unwrap_or(0);
    let bytes = 256 << 20;
    let measure = |to: usize| match ep_mesh::bandwidth::copy_bandwidth(0, to, bytes, 20) {
        Ok(b) => {
            println!(
                "copy GPU0 -> GPU{to}, {} MiB: {:.1} GB/s ({:.1} µs)",
                bytes >> 20,
                b.gbps,
                b.time.as_secs_f64() * 1e6
            );
            Some(b.gbps)
        }
        Err(e) => {
            eprintln!("bench: copy rate GPU0 -> GPU{to} not measured: {e}");
            None
        }
    };
    Rates {
        device: measure(0),
        peer: (gpus > 1 && o.ranks > 1).then(|| measure(1)).flatten(),
        gpus,
    }
}

#[cfg(not(feature = "cuda"))]
fn rates(_o: &Options) -> Rates {
    Rates::default()
}

/// Rank `rank`'s part of a MoE layer with the bench's shape, its parameters in
/// `dtype`.
fn moe_layer<B: ExpertParallelBackend>(
    o: &Options,
    hidden: usize,
    ffn: usize,
    rank: usize,
    device: &B::Device,
    dtype: DType,
) -> MoeLayer<B> {
    let mut layer =
        MoeConfig::new(hidden, ffn, o.experts, o.top_k).init::<B>(rank, o.ranks, 7, device);
    // Detached after the cast, so each is a leaf again and can be a parameter.
    let cast3 = |p: &Param<Tensor<B, 3>>| Param::from_tensor(p.val().cast(dtype).detach());
    layer.experts.w_gate = cast3(&layer.experts.w_gate);
    layer.experts.w_up = cast3(&layer.experts.w_up);
    layer.experts.w_down = cast3(&layer.experts.w_down);
    layer.router.gate = Param::from_tensor(layer.router.gate.val().cast(dtype).detach());
    layer.router.bias =
        Param::from_tensor(layer.router.bias.val().cast(dtype).detach()).set_require_grad(false);
    layer
}

/// The experts' forward flops on one rank: three `[rows, H] x [H, F]`-sized
/// products per routed (token, expert) pair, `T K / W` pairs per rank on average.
fn moe_flops(o: &Options, tokens: usize, hidden: usize, ffn: usize) -> usize {
    3 * 2 * tokens * o.top_k * hidden * ffn
}

fn group_barrier<B: ExpertParallelBackend>(group: &EpGroup<B>) {
    group.barrier().expect("barrier failed");
}

fn main() {
    let o = Options::parse();
    refuse_unbuilt::<Options>(o.backend);
    let cpu = o.backend == BackendName::Ndarray;
    let hidden = o.hidden.unwrap_or(if cpu { 256 } else { 7168 });
    let default_dtype = if cpu {
        PayloadType::F32
    } else {
        PayloadType::Bf16
    };
    let dtype = match o.dtype.unwrap_or(default_dtype) {
        PayloadType::Bf16 => DType::BF16,
        PayloadType::F16 => DType::F16,
        PayloadType::F32 => DType::F32,
    };
    println!(
        "burn-ep bench: backend {}, {} ranks, H={hidden}, K={}, E={}, {dtype:?}, routing {}, {} transport, {} padding",
        name_of(o.backend),
        o.ranks,
        o.top_k,
        o.experts,
        name_of(o.routing),
        o.transport,
        name_of(o.padding)
    );
    let rates = rates(&o);
    if rates.device.is_none() {
        println!("copy rates: not measured (CUDA backend only): no ceiling, no floor");
    }
    // Ranks on one GPU share its HBM: their floors add up.
    let shared_gpu = o.transport == Transport::Local || rates.gpus < 2;
    println!(
        "{:>6}  {:<30} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>5} {:>4} {:>4} {:>5} {:>8}",
        "T",
        "phase",
        "p10 µs",
        "median",
        "p90 µs",
        "MB recv",
        "GB/s",
        "ceiling",
        "floor µs",
        "x floor",
        "syncs",
        "ctrl",
        "exch",
        "kern",
        "MB sent"
    );
    let mut json = Vec::new();
    for (n, &tokens) in o.tokens.iter().enumerate() {
        eprintln!("[{}/{}] T={tokens} ...", n + 1, o.tokens.len());
        let phases = match o.backend {
            BackendName::Ndarray => run::<Autodiff<burn::backend::NdArray<f32>>>(
                &o,
                tokens,
                |_| Default::default(),
                dtype,
                hidden,
                shared_gpu,
            ),
            #[cfg(feature = "wgpu")]
            BackendName::Wgpu => run::<Autodiff<Wgpu>>(
                &o,
                tokens,
                |_| Default::default(),
                dtype,
                hidden,
                shared_gpu,
            ),
            #[cfg(all(feature = "wgpu", feature = "fusion"))]
            BackendName::WgpuFusion => run::<Autodiff<burn::backend::Wgpu<f32, i32>>>(
                &o,
                tokens,
                |_| Default::default(),
                dtype,
                hidden,
                shared_gpu,
            ),
            #[cfg(feature = "cuda")]
            BackendName::Cuda => run::<Autodiff<Cuda>>(
                &o,
                tokens,
                burn::backend::cuda::CudaDevice::new,
                dtype,
                hidden,
                shared_gpu,
            ),
            #[cfg(all(feature = "cuda", feature = "fusion"))]
            BackendName::CudaFusion => run::<Autodiff<burn::backend::Cuda<f32, i32>>>(
                &o,
                tokens,
                burn::backend::cuda::CudaDevice::new,
                dtype,
                hidden,
                shared_gpu,
            ),
            // Every backend is built in where every feature is on.
            #[allow(unreachable_patterns)]
            other => unreachable!("{other:?} was checked by refuse_unbuilt"),
        };
        for p in &phases {
            let (p10, median, p90) = p.stats();
            let gbps = p.bytes as f64 / (median * 1e-6) / 1e9;
            let fraction = rates.ceiling().filter(|_| p.bytes > 0).map(|c| gbps / c);
            // A copy of n bytes reads and writes n bytes: HBM moves 2n.
            let floor_us = rates
                .device
                .filter(|_| p.floor_bytes > 0)
                .map(|r| p.floor_bytes as f64 / (2.0 * r * 1e9) * 1e6);
            let shown = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
            let c = p.counts;
            println!(
                "{tokens:>6}  {:<30} {p10:>9.1} {median:>9.1} {p90:>9.1} {:>8.2} {gbps:>8.2} {:>8} {:>9} {:>8} {:>5} {:>4} {:>4} {:>5} {:>8.2}",
                p.name,
                p.bytes as f64 / 1e6,
                shown(fraction, &|f| format!("{:.1}%", 100.0 * f)),
                shown(floor_us, &|f| format!("{f:.1}")),
                shown(floor_us, &|f| format!("{:.2}", median / f)),
                c.host_syncs,
                c.control_messages,
                c.exchanges,
                c.kernel_launches,
                c.sent_bytes as f64 / 1e6,
            );
            if p.flops > 0 {
                let tflops = p.flops as f64 / (median * 1e-6) / 1e12;
                println!(
                    "{:>8}{tflops:.2} TFLOP/s per rank: the expert products' flops over the median",
                    ""
                );
            }
            let json_num = |v: Option<f64>| v.map_or("null".into(), |v| format!("{v:.4}"));
            json.push(format!(
                "{{\"tokens\":{tokens},\"phase\":\"{}\",\"p10_us\":{p10:.2},\"median_us\":{median:.2},\"p90_us\":{p90:.2},\"bytes\":{},\"gbps\":{gbps:.3},\"ceiling_fraction\":{},\"floor_us\":{},\"host_syncs\":{},\"control_messages\":{},\"exchanges\":{},\"kernel_launches\":{},\"sent_bytes\":{}}}",
                p.name,
                p.bytes,
                json_num(fraction),
                json_num(floor_us),
                c.host_syncs,
                c.control_messages,
                c.exchanges,
                c.kernel_launches,
                c.sent_bytes,
            ));
        }
    }
    if let Some(path) = &o.json {
        let body = format!(
            "{{\"backend\":\"{}\",\"ranks\":{},\"hidden\":{hidden},\"top_k\":{},\"experts\":{},\"dtype\":\"{dtype:?}\",\"routing\":\"{}\",\"transport\":\"{}\",\"ceiling_gbps\":{},\"results\":[{}]}}\n",
            name_of(o.backend), o.ranks, o.top_k, o.experts, name_of(o.routing), o.transport,
            rates.ceiling().map_or("null".into(), |c| format!("{c:.2}")),
            json.join(",")
        );
        std::fs::write(path, body).expect("writing the JSON file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_is_refused_and_named() {
        for (flag, value) in [
            ("--routing", "zipf"),
            ("--dtype", "f8"),
            ("--padding", "ragged"),
            ("--transport", "infiniband"),
            ("--backend", "tpu"),
            ("--tokens", "128,lots"),
            ("--ranks", "0"),
        ] {
            let err = Options::try_parse_from(["bench", flag, value]).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(value.rsplit(',').next().unwrap()),
                "{message}"
            );
            assert!(message.contains(flag), "{message}");
        }
    }

    #[test]
    fn values_parse_to_what_they_name() {
        let o = Options::try_parse_from([
            "bench",
            "--routing",
            "sentinel",
            "--dtype",
            "f16",
            "--padding",
            "uniform",
            "--tokens",
            "128,4096",
            "--transport",
            "cuda-peer",
        ])
        .unwrap();
        assert_eq!(o.routing, RoutingName::Sentinel);
        assert_eq!(o.dtype, Some(PayloadType::F16));
        assert!(o.uniform_expert_rows());
        assert_eq!(o.tokens, [128, 4096]);
        assert_eq!(o.transport, Transport::CudaPeer);
        assert_eq!(name_of(o.routing), "sentinel");
    }
}
