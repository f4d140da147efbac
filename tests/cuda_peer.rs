//! The cuda-peer transport: ranks as threads of one process, rows moving between
//! device buffers by copies (peer copies across GPUs, device copies between ranks
//! sharing one), or, in two-rank groups, written and read by the kernels in the
//! peer's buffers. On a one-GPU host every rank shares device 0, which runs the whole
//! transport path. With the `cuda` feature the other test binaries run their groups
//! on it too (`common::transport`); this file checks what is particular to it.

mod common;

#[cfg(feature = "cuda")]
mod on_cuda {
    use super::common::*;
    use burn_ep::{EpConfig, Transport};
    use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
    use rstest::rstest;

    #[rstest]
    fn cuda_peer_matches_reference(
        #[values(2, 4)] world: usize,
        #[values(1, 8)] alignment: usize,
        #[values(
            RoutingPattern::Uniform,
            RoutingPattern::AllToOneRank,
            RoutingPattern::NoTokensOnLastRank
        )]
        pattern: RoutingPattern,
        #[values(SentinelPattern::None, SentinelPattern::RandomTenth)] sentinels: SentinelPattern,
    ) {
        let config = EpConfig::new(world, 4 * world, 3, 36).with_expert_alignment(alignment);
        let batches = synthetic_batches(&config, 37, pattern, sentinels, 4);
        let fresh = fresh_payload(&config, &batches, 37, pattern, sentinels);
        check_against_reference_on::<Cube>(
            Transport::CudaPeer,
            Default::default(),
            config,
            batches,
            fresh,
        );
    }

    /// What one rank saw of one layer: expert-major rows, combine output, replay.
    type LayerOutcome = (Vec<f32>, Vec<f32>, Vec<f32>);

    /// Three layers' recording dispatches, then their replays in reverse order,
    /// then their combines, queued back to back on every rank with nothing read
    /// until the end: only the device orders the copies against the kernels, with
    /// the transport's events reused call after call and CubeCL's pool recycling
    /// the buffers. A recording dispatch waits on the host once, for its counts
    /// (not at all on a rank without tokens); a replay and a combine never do.
    #[rstest]
    fn calls_queue_on_the_device_without_host_waits(
        #[values(2, 4)] world: usize,
        #[values(RoutingPattern::Uniform, RoutingPattern::NoTokensOnLastRank)]
        pattern: RoutingPattern,
    ) {
        use ep_core::counters;
        use ep_core::reference;
        let config = EpConfig::new(world, 4 * world, 3, 40);
        let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
        let sentinels = SentinelPattern::RandomTenth;
        let layers: Vec<_> = [29, 64, 7]
            .into_iter()
            .enumerate()
            .map(|(l, tokens)| {
                let batches = synthetic_batches(&config, tokens, pattern, sentinels, 20 + l as u64);
                let fresh = fresh_payload(&config, &batches, tokens, pattern, sentinels);
                (batches, fresh)
            })
            .collect();
        let device = Default::default();

        let outcomes: Vec<Vec<LayerOutcome>> =
            run_group_on::<Cube, _, _>(Transport::CudaPeer, &config, &device, |group| {
                let rank = group.rank();
                let syncs_of = |call: &mut dyn FnMut()| {
                    let before = counters::snapshot();
                    call();
                    (counters::snapshot() - before).host_syncs
                };
                let mut dispatched = Vec::new();
                for (batches, _) in &layers {
                    let (x, idx, w) = inputs::<Cube>(&batches[rank], k, &device);
                    let mut d = None;
                    let syncs = syncs_of(&mut || {
                        d = Some(group.dispatch(x.clone(), idx.clone(), w.clone()))
                    });
                    // One read of the counts; none on a rank that sends nothing.
                    let expected = u64::from(batches[rank].tokens > 0);
                    assert_eq!(
                        syncs, expected,
                        "rank {rank}: host waits of a recording dispatch"
                    );
                    dispatched.push(d.unwrap()?);
                }
                let mut replays = vec![None; layers.len()];
                for (l, (_, fresh)) in layers.iter().enumerate().rev() {
                    let x = floats::<Cube>(&fresh[rank].x, [fresh[rank].tokens, h], &device);
                    let routing = &dispatched[l].routing;
                    let mut r = None;
                    let syncs =
                        syncs_of(&mut || r = Some(group.dispatch_cached(x.clone(), routing)));
                    assert_eq!(syncs, 0, "rank {rank}: host waits of a replay");
                    replays[l] = Some(r.unwrap()?);
                }
                let mut combines = Vec::new();
                for d in &dispatched {
                    let offsets = d.routing.expert_offsets().to_vec();
                    let y = apply_experts(d.rows.clone(), &offsets, rank * local);
                    let mut c = None;
                    let syncs = syncs_of(&mut || c = Some(group.combine(y.clone(), &d.routing)));
                    assert_eq!(syncs, 0, "rank {rank}: host waits of a combine");
                    combines.push(c.unwrap()?);
                }
                Ok(dispatched
                    .into_iter()
                    .zip(combines)
                    .zip(replays)
                    .map(|((d, c), r)| (host(d.rows), host(c), host(r.unwrap())))
                    .collect())
            })
            .into_iter()
            .map(|r| r.unwrap())
            .collect();

        for (l, (batches, fresh)) in layers.iter().enumerate() {
            let expected = reference::dispatch(&config, batches).unwrap();
            let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
            let combined = reference_combine(&config, batches, &expected);
            let xs: Vec<&[f32]> = fresh.iter().map(|b| b.x.as_slice()).collect();
            let replayed = reference::dispatch_cached(&routings, &xs, h);
            for (rank, outcome) in outcomes.iter().enumerate() {
                let (rows, combine, replay) = &outcome[l];
                assert_eq!(rows, &expected[rank].rows, "layer {l} rank {rank}: rows");
                assert_combine_eq(
                    combine,
                    &combined[rank],
                    expert_scale(config.num_experts - 1),
                    &format!("layer {l} rank {rank}: combine"),
                );
                assert_eq!(replay, &replayed[rank], "layer {l} rank {rank}: replay");
            }
        }
    }

    /// Two handles interleaved, twice over: record A, record B, replay A right after
    /// B's record, combine B, combine A, then a rank-major dispatch and its combine.
    /// Two ranks take the direct route (the pack writes into the peer's receive
    /// buffers, the sum reads the peer's returned rows where they are), three the
    /// transport's copies. Each round's every output is bitwise the previous
    /// round's, and the rows are the reference's; one token a rank and none on the
    /// last rank included.
    #[rstest]
    fn interleaved_handles_repeat_bitwise(
        #[values(2, 3)] world: usize,
        #[values(1, 33)] tokens: usize,
        #[values(RoutingPattern::Uniform, RoutingPattern::NoTokensOnLastRank)]
        pattern: RoutingPattern,
    ) {
        use ep_core::reference;
        let config = EpConfig::new(world, 2 * world, 2, 24);
        let (k, local) = (config.top_k, config.experts_per_rank());
        let sentinels = SentinelPattern::RandomTenth;
        let a = synthetic_batches(&config, tokens, pattern, sentinels, 41);
        let b = synthetic_batches(&config, tokens + 5, pattern, sentinels, 42);
        let device = Default::default();

        let rounds: Vec<Vec<Vec<Vec<f32>>>> =
            run_group_on::<Cube, _, _>(Transport::CudaPeer, &config, &device, |group| {
                let rank = group.rank();
                let (xa, ia, wa) = inputs::<Cube>(&a[rank], k, &device);
                let (xb, ib, wb) = inputs::<Cube>(&b[rank], k, &device);
                let mut rounds = Vec::new();
                for _ in 0..2 {
                    let da = group.dispatch(xa.clone(), ia.clone(), wa.clone())?;
                    let db = group.dispatch(xb.clone(), ib.clone(), wb.clone())?;
                    let ra = group.dispatch_cached(xa.clone(), &da.routing)?;
                    let experts = |d: &burn_ep::Dispatched<Cube>| {
                        let offsets = d.routing.expert_offsets().to_vec();
                        apply_experts(d.rows.clone(), &offsets, rank * local)
                    };
                    let cb = group.combine(experts(&db), &db.routing)?;
                    let ca = group.combine(experts(&da), &da.routing)?;
                    let m = group.dispatch_rank_major(xa.clone(), ia.clone(), wa.clone())?;
                    let back = group.combine(m.rows.clone(), &m.routing)?;
                    rounds.push(
                        [da.rows, db.rows, ra, cb, ca, m.rows, back]
                            .into_iter()
                            .map(host)
                            .collect(),
                    );
                }
                Ok(rounds)
            })
            .into_iter()
            .map(|r| r.unwrap())
            .collect();

        let (expected_a, expected_b) = (
            reference::dispatch(&config, &a).unwrap(),
            reference::dispatch(&config, &b).unwrap(),
        );
        for (rank, outputs) in rounds.iter().enumerate() {
            let names = ["rows A", "rows B", "replay A", "combine B", "combine A"];
            let names = names
                .iter()
                .chain(&["rank-major rows", "rank-major combine"]);
            for (name, (first, second)) in names.zip(outputs[0].iter().zip(&outputs[1])) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(first), bits(second), "rank {rank}: {name}, round 2");
            }
            assert_eq!(outputs[0][0], expected_a[rank].rows, "rank {rank}: rows A");
            assert_eq!(outputs[0][1], expected_b[rank].rows, "rank {rank}: rows B");
            assert_eq!(
                outputs[0][2], expected_a[rank].rows,
                "rank {rank}: replay A"
            );
        }
    }

    /// What one rank saw: the bytes each operation sent (recording dispatch,
    /// replay, combine, then rank-major dispatch and its combine), the dispatched
    /// rows, the combine, and the rank-major combine.
    type OwnRowsOutcome = ([u64; 5], Vec<f32>, Vec<f32>, Vec<f32>);

    /// A rank's own rows never cross the transport: the pack writes them to their
    /// place in the rank's receive buffers and combine's sum reads them where they
    /// are. What each operation sent (the transport's own count) is the rows bound
    /// for other ranks, counted from the reference's routing; a full all-to-all
    /// would send the rank's own rows as well. The rows and sums still match the
    /// reference, in both layouts.
    #[rstest]
    fn own_rows_never_cross_the_transport(
        #[values(2, 3)] world: usize,
        #[values(RoutingPattern::Uniform, RoutingPattern::AllToOneRank)] pattern: RoutingPattern,
    ) {
        use ep_core::{counters, reference};
        let config = EpConfig::new(world, 2 * world, 2, 24);
        let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
        let batches = synthetic_batches(&config, 33, pattern, SentinelPattern::RandomTenth, 9);
        let expected = reference::dispatch(&config, &batches).unwrap();
        let device = Default::default();

        let outcomes: Vec<OwnRowsOutcome> =
            run_group_on::<Cube, _, _>(Transport::CudaPeer, &config, &device, |group| {
                let rank = group.rank();
                let (x, idx, w) = inputs::<Cube>(&batches[rank], k, &device);
                let sent_by = |call: &mut dyn FnMut()| {
                    let before = counters::snapshot();
                    call();
                    (counters::snapshot() - before).sent_bytes
                };
                let mut bytes = [0; 5];
                let mut d = None;
                bytes[0] =
                    sent_by(&mut || d = Some(group.dispatch(x.clone(), idx.clone(), w.clone())));
                let d = d.unwrap()?;
                let mut r = None;
                bytes[1] = sent_by(&mut || r = Some(group.dispatch_cached(x.clone(), &d.routing)));
                let offsets = d.routing.expert_offsets().to_vec();
                let y = apply_experts(d.rows.clone(), &offsets, rank * local);
                let mut c = None;
                bytes[2] = sent_by(&mut || c = Some(group.combine(y.clone(), &d.routing)));
                let mut m = None;
                bytes[3] = sent_by(&mut || {
                    m = Some(group.dispatch_rank_major(x.clone(), idx.clone(), w.clone()))
                });
                let m = m.unwrap()?;
                // Identity experts: each token comes back once from every rank it
                // went to.
                let mut back = None;
                bytes[4] = sent_by(&mut || back = Some(group.combine(m.rows.clone(), &m.routing)));
                Ok((bytes, host(d.rows), host(c.unwrap()?), host(back.unwrap()?)))
            })
            .into_iter()
            .map(|r| r.unwrap())
            .collect();

        // Rows rank `s` sends rank `d`: those `d` received from `s`.
        let rows_between = |s: usize, d: usize| {
            expected[d]
                .routing
                .received
                .iter()
                .filter(|&&(src, _)| src == s)
                .count() as u64
        };
        let combined = reference_combine(&config, &batches, &expected);
        let (row, meta) = (4 * h as u64, 4 * k as u64);
        for (rank, (bytes, rows, combine, rank_major_back)) in outcomes.iter().enumerate() {
            let peers = (0..world).filter(|&p| p != rank);
            let out: u64 = peers.clone().map(|d| rows_between(rank, d)).sum();
            let back: u64 = peers.map(|s| rows_between(s, rank)).sum();
            let record = out * (row + 2 * meta);
            assert_eq!(
                bytes,
                &[record, out * row, back * row, record, back * row],
                "rank {rank}: bytes sent by dispatch, replay, combine, rank-major dispatch, \
                 its combine ({} of its rows are its own)",
                rows_between(rank, rank)
            );
            assert_eq!(rows, &expected[rank].rows, "rank {rank}: rows");
            let scale = expert_scale(config.num_experts - 1);
            assert_combine_eq(
                combine,
                &combined[rank],
                scale,
                &format!("rank {rank}: combine"),
            );
            let batch = &batches[rank];
            let want: Vec<f32> = (0..batch.tokens)
                .flat_map(|t| {
                    let ids = &batch.topk_idx[t * k..(t + 1) * k];
                    let ranks = (0..world)
                        .filter(|&r| ids.iter().any(|&e| e >= 0 && e as usize / local == r))
                        .count();
                    batch.x[t * h..(t + 1) * h]
                        .iter()
                        .map(move |&v| v * ranks as f32)
                })
                .collect();
            assert_combine_eq(
                rank_major_back,
                &want,
                world as f32,
                &format!("rank {rank}: rank-major combine"),
            );
        }
    }

    /// What one rank of a lane test saw: its device index, its dispatched rows, its
    /// combine, the MoE layer's output and the gradient of its input.
    type LaneOutcome = (usize, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

    /// Ranks that share a GPU each get a CubeCL server of their own on it (a lane,
    /// `CudaDevice::lane`), so their launches do not take turns on one lock. The
    /// device indices the runner hands out are distinct and run on the GPUs the
    /// transport placed the ranks on; dispatch and combine on them match the
    /// reference; and the MoE layer (its experts on cuBLAS, whose handles follow the
    /// GPU, not the lane) gives, forward and backward, bit for bit what it gives
    /// with every rank on one server.
    #[test]
    fn ranks_sharing_a_gpu_run_on_servers_of_their_own() {
        use burn::backend::Autodiff;
        use burn::tensor::{Tensor, TensorData};
        use burn_ep::moe::MoeConfig;
        use burn_ep::{run_ranks, EpGroup};
        use cubecl::cuda::CudaDevice;
        use ep_core::reference;
        type Ad = Autodiff<Cube>;
        let world = 3;
        let config = EpConfig::new(world, 2 * world, 2, 16);
        let (k, h, local) = (config.top_k, config.hidden_size, config.experts_per_rank());
        let (p, s) = (RoutingPattern::Uniform, SentinelPattern::RandomTenth);
        let batches = synthetic_batches(&config, 21, p, s, 5);
        let moe = MoeConfig::new(h, 24, config.num_experts, k);
        let tokens = 19;
        let work = |group: EpGroup<Ad>| -> burn_ep::EpResult<LaneOutcome> {
            let (rank, device) = (group.rank(), group.device().clone());
            let (x, idx, w) = inputs::<Ad>(&batches[rank], k, &device);
            let d = group.dispatch(x, idx, w)?;
            let offsets = d.routing.expert_offsets().to_vec();
            let y = apply_experts(d.rows.clone(), &offsets, rank * local);
            let combined = group.combine(y, &d.routing)?;
            let layer = moe.init::<Ad>(rank, world, 11, &device);
            let values: Vec<f32> = (0..tokens * h)
                .map(|i| ((i * 7 + rank * 13) % 17) as f32 / 17.0 - 0.5)
                .collect();
            let x = Tensor::<Ad, 2>::from_data(TensorData::new(values, [tokens, h]), &device)
                .require_grad();
            let out = layer.forward(x.clone(), &group)?.out;
            let grads = out.clone().sum().backward();
            let dx = x.grad(&grads).expect("x takes part in the loss");
            Ok((
                device.index,
                host(d.rows),
                host(combined),
                host(out),
                host(dx),
            ))
        };
        let lanes: Vec<LaneOutcome> = run_ranks(
            Transport::CudaPeer,
            &options(),
            &config,
            |_, index| CudaDevice::new(index),
            work,
        )
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
        let shared: Vec<LaneOutcome> = run_ranks(
            Transport::CudaPeer,
            &options(),
            &config,
            |_, index| CudaDevice::new(CudaDevice::new(index).ordinal()),
            work,
        )
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();

        let gpus = ep_mesh::cuda_device_count().unwrap();
        let mut indices: Vec<usize> = lanes.iter().map(|l| l.0).collect();
        for (rank, &index) in indices.iter().enumerate() {
            // The transport places rank r on GPU r mod (GPUs in use).
            let gpu = rank % gpus.min(world);
            assert_eq!(
                CudaDevice::new(index).ordinal(),
                gpu,
                "rank {rank}: its GPU"
            );
        }
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(
            indices.len(),
            world,
            "every rank a server of its own: {indices:?}"
        );

        let expected = reference::dispatch(&config, &batches).unwrap();
        let combined = reference_combine(&config, &batches, &expected);
        for (rank, (lane, one)) in lanes.iter().zip(&shared).enumerate() {
            assert_eq!(lane.1, expected[rank].rows, "rank {rank}: rows");
            assert_combine_eq(
                &lane.2,
                &combined[rank],
                expert_scale(config.num_experts - 1),
                &format!("rank {rank}: combine"),
            );
            assert_eq!(
                lane.3, one.3,
                "rank {rank}: MoE output, lanes against one server"
            );
            assert_eq!(
                lane.4, one.4,
                "rank {rank}: MoE input gradient, lanes against one server"
            );
        }
    }

    /// The tensor-op fallback has no device path: the cuda-peer transport moves its
    /// rows as host data through the control channel, with the same results.
    #[test]
    fn cuda_peer_serves_host_backends() {
        let config = EpConfig::new(2, 8, 2, 5);
        let (p, s) = (RoutingPattern::Skewed, SentinelPattern::RandomTenth);
        let batches = synthetic_batches(&config, 11, p, s, 6);
        let fresh = fresh_payload(&config, &batches, 11, p, s);
        check_against_reference_on::<NdArray>(
            Transport::CudaPeer,
            Default::default(),
            config,
            batches,
            fresh,
        );
    }
}

/// Without the `cuda` feature the device transports (cuda-peer, nccl, hierarchical)
/// are refused by name, not silently replaced.
#[cfg(not(feature = "cuda"))]
#[test]
fn device_transports_need_the_cuda_feature() {
    use burn_ep::{run_ranks, EpConfig, EpError, Transport};
    use common::{options, NdArray};
    let config = EpConfig::new(2, 4, 1, 3);
    for transport in [
        Transport::CudaPeer,
        Transport::Nccl,
        Transport::Hierarchical,
    ] {
        let result = run_ranks::<NdArray, (), _, _>(
            transport,
            &options(),
            &config,
            |_, _| Default::default(),
            |_| Ok(()),
        );
        match result {
            Err(EpError::InvalidConfig(msg)) => {
                assert!(
                    msg.contains(&format!("the {transport} transport needs")),
                    "{msg}"
                );
                assert!(msg.contains("cuda"), "{msg}");
            }
            other => panic!(
                "{transport}: expected InvalidConfig, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

/// The CubeCL runtimes say by their type whether their buffers are CUDA memory
/// (`EpRuntime`), which the device transports and cuBLAS read: on CUDA a buffer
/// gives its address, the stream of the thread that made it and its GPU, a lane
/// (a second server on the GPU) the same GPU and a stream of its own; on any other
/// runtime asking is refused by name.
#[test]
fn the_runtime_says_where_its_buffers_are() {
    use burn::tensor::Tensor;
    use burn_ep::steps::EpRuntime;
    use burn_ep::EpError;
    use common::{cube_available, Cube, CubeRuntime};
    if !cube_available() {
        return;
    }
    let tensor = |device| {
        Tensor::<Cube, 2>::zeros([4, 8], &device)
            .into_primitive()
            .tensor()
    };
    let (a, b) = (tensor(Default::default()), tensor(Default::default()));
    if !CubeRuntime::CUDA {
        let err = CubeRuntime::cuda_buffer(&a).unwrap_err();
        assert!(
            matches!(&err, EpError::Transport(m) if m.contains("not CUDA")),
            "{err:?}"
        );
        return;
    }
    let (a, b) = (
        CubeRuntime::cuda_buffer(&a).unwrap(),
        CubeRuntime::cuda_buffer(&b).unwrap(),
    );
    assert!(a.address != 0 && b.address != 0 && a.address != b.address);
    assert_eq!(a.stream, b.stream, "one thread's buffers share its stream");
    assert_eq!((a.ordinal, b.ordinal), (0, 0));
    #[cfg(feature = "cuda")]
    {
        let lane = tensor(burn::backend::cuda::CudaDevice::lane(0, 1));
        let lane = CubeRuntime::cuda_buffer(&lane).unwrap();
        assert_eq!(lane.ordinal, 0, "a lane runs on its GPU");
        assert_ne!(
            lane.stream, a.stream,
            "a lane orders its buffers on its own stream"
        );
    }
}
