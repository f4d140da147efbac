//! EpGroup beyond the grid: several layers on one group, sequence-parallel padding,
//! and the errors bad input must give.

mod common;

use burn_ep::ExpertParallelBackend;
use common::*;
use ep_core::reference::{self, RankBatch};
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};
use ep_core::{EpConfig, EpError};
use rstest::rstest;

/// Runs the case on `which`, unless that backend has no device here.
fn on(
    which: Which,
    ndarray: impl FnOnce(burn::tensor::Device<NdArray>),
    wgpu: impl FnOnce(burn::tensor::Device<Cube>),
) {
    match which {
        Which::NdArray => ndarray(Default::default()),
        Which::Cube if cube_available() => wgpu(Default::default()),
        Which::Cube => {}
        Which::Fused => unreachable!("these cases name their backends"),
    }
}

/// The reference's dispatch, the test experts and combine: each rank's output.
fn reference_round_trip(config: &EpConfig, batches: &[RankBatch]) -> Vec<Vec<f32>> {
    reference_combine(
        config,
        batches,
        &reference::dispatch(config, batches).unwrap(),
    )
}

/// One group, three layers: three dispatches with three handles, then the combines
/// in reverse order (as a backward pass would), each against its own reference.
fn three_layers<B: ExpertParallelBackend>(device: B::Device) {
    let config = EpConfig::new(4, 8, 2, 6).with_expert_alignment(4);
    let local = config.experts_per_rank();
    let layers: Vec<Vec<RankBatch>> = [
        (RoutingPattern::Uniform, SentinelPattern::None),
        (RoutingPattern::Skewed, SentinelPattern::RandomTenth),
        (RoutingPattern::AllToOneRank, SentinelPattern::WholeRows),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(p, s))| synthetic_batches(&config, 10 + 3 * i, p, s, 100 + i as u64))
    .collect();

    let outcomes = run_group::<B, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let dispatched: Vec<_> = layers
            .iter()
            .map(|batches| {
                let (x, idx, w) = inputs::<B>(&batches[rank], config.top_k, &device);
                group.dispatch(x, idx, w)
            })
            .collect::<Result<_, _>>()?;
        let mut combined = Vec::new();
        for d in dispatched.iter().rev() {
            let y = apply_experts(d.rows.clone(), d.routing.expert_offsets(), rank * local);
            combined.push(host(group.combine(y, &d.routing)?));
        }
        combined.reverse();
        Ok(combined)
    });
    let outcomes: Vec<Vec<Vec<f32>>> = outcomes.into_iter().map(|r| r.unwrap()).collect();
    for (layer, batches) in layers.iter().enumerate() {
        let combined = reference_round_trip(&config, batches);
        for rank in 0..config.world_size {
            assert_combine_eq(
                &outcomes[rank][layer],
                &combined[rank],
                expert_scale(config.num_experts - 1),
                &format!("layer {layer} rank {rank}"),
            );
        }
    }
}

#[rstest]
fn one_group_serves_three_layers(#[values(Which::NdArray, Which::Cube)] which: Which) {
    on(which, three_layers::<NdArray>, three_layers::<Cube>);
}

/// A replay of one handle right after a recording dispatch of another, on the same
/// group: the replay moves its own handle's rows (checked against the reference),
/// not the newer handle's, and the newer handle still combines right.
fn replay_after_another_record<B: ExpertParallelBackend>(device: B::Device) {
    let config = EpConfig::new(2, 8, 3, 12).with_expert_alignment(4);
    let local = config.experts_per_rank();
    let first = synthetic_batches(
        &config,
        9,
        RoutingPattern::Skewed,
        SentinelPattern::RandomTenth,
        3,
    );
    let second = synthetic_batches(
        &config,
        14,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        4,
    );
    let replayed_batches = fresh_payload(
        &config,
        &first,
        9,
        RoutingPattern::Skewed,
        SentinelPattern::RandomTenth,
    );
    let outcomes = run_group::<B, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let (x, idx, w) = inputs::<B>(&first[rank], config.top_k, &device);
        let a = group.dispatch(x, idx, w)?;
        let (x, idx, w) = inputs::<B>(&second[rank], config.top_k, &device);
        let b = group.dispatch(x, idx, w)?;
        let (fresh, _, _) = inputs::<B>(&replayed_batches[rank], config.top_k, &device);
        let replayed = group.dispatch_cached(fresh, &a.routing)?;
        let y = apply_experts(b.rows.clone(), b.routing.expert_offsets(), rank * local);
        Ok((host(replayed), host(group.combine(y, &b.routing)?)))
    });
    let want_replay = reference::dispatch(&config, &replayed_batches).unwrap();
    let combined = reference_round_trip(&config, &second);
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let (replayed, out) = outcome.unwrap();
        assert_eq!(
            replayed, want_replay[rank].rows,
            "replayed rows, rank {rank}"
        );
        assert_combine_eq(
            &out,
            &combined[rank],
            expert_scale(config.num_experts - 1),
            &format!("combine, rank {rank}"),
        );
    }
}

#[rstest]
fn a_replay_right_after_a_record_on_another_handle(
    #[values(Which::NdArray, Which::Cube)] which: Which,
) {
    on(
        which,
        replay_after_another_record::<NdArray>,
        replay_after_another_record::<Cube>,
    );
}

/// Dispatch + combine with sequence-parallel padding equals the reference on the
/// unpadded tokens; with the token count already divisible it is bitwise the same
/// as without padding.
fn sp_padding<B: ExpertParallelBackend>(device: B::Device, tokens: usize, sp: usize) {
    let base = EpConfig::new(2, 4, 2, 5).with_expert_alignment(8);
    let batches = synthetic_batches(
        &base,
        tokens,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        5,
    );
    let run = |config: &EpConfig| -> Vec<(Vec<f32>, Vec<f32>, usize)> {
        run_group::<B, _, _>(config, &device, |group| {
            let rank = group.rank();
            let (x, idx, w) = inputs::<B>(&batches[rank], config.top_k, &device);
            let d = group.dispatch(x, idx, w)?;
            let y = apply_experts(d.rows.clone(), d.routing.expert_offsets(), rank * 2);
            let out = group.combine(y, &d.routing)?;
            assert_eq!(out.dims(), [tokens, config.hidden_size]);
            Ok((host(d.rows), host(out), d.routing.received_rows()))
        })
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
    };
    let padded = run(&base.clone().with_sp_size(sp));
    let plain = run(&base);
    // Pad rows carry -1 in every slot: they move nothing and the results match.
    for (rank, (a, b)) in padded.iter().zip(&plain).enumerate() {
        assert_eq!(a.0, b.0, "rows, rank {rank}, tokens {tokens}, sp {sp}");
        assert_eq!(a.2, b.2, "received, rank {rank}, tokens {tokens}, sp {sp}");
        for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
            assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "combine element {i}, rank {rank}, tokens {tokens}, sp {sp}"
            );
        }
    }

    let expected = reference::dispatch(&base, &batches).unwrap();
    for (rank, (rows, _, received)) in padded.iter().enumerate() {
        assert_eq!(rows, &expected[rank].rows);
        assert_eq!(*received, expected[rank].routing.received.len());
    }
}

#[rstest]
#[case(7, 4)]
#[case(1, 8)]
#[case(8, 4)]
#[case(0, 4)]
fn sequence_parallel_padding(
    #[values(Which::NdArray, Which::Cube)] which: Which,
    #[case] tokens: usize,
    #[case] sp: usize,
) {
    on(
        which,
        |d| sp_padding::<NdArray>(d, tokens, sp),
        |d| sp_padding::<Cube>(d, tokens, sp),
    );
}

fn errors<B: ExpertParallelBackend>(device: B::Device) {
    let config = EpConfig::new(2, 4, 2, 3).with_max_tokens_per_rank(6);
    let batches = synthetic_batches(
        &config,
        5,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        9,
    );

    // A bad expert id on rank 1: rank 1 names it, rank 0 learns its peer failed.
    let results = run_group::<B, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let mut batch = batches[rank].clone();
        if rank == 1 {
            batch.topk_idx[3] = 4;
        }
        let (x, idx, w) = inputs::<B>(&batch, 2, &device);
        group.dispatch(x, idx, w).map(|_| ())
    });
    assert_eq!(
        results[1],
        Err(EpError::ExpertIdOutOfRange {
            rank: 1,
            token: 1,
            slot: 1,
            id: 4,
            num_experts: 4
        })
    );
    assert!(
        matches!(results[0], Err(EpError::PeerFailed { rank: 1, .. })),
        "{:?}",
        results[0]
    );

    let results = run_group::<B, _, _>(&config, &device, |group| {
        let rank = group.rank();
        let b = &batches[rank];
        let (x, idx, w) = inputs::<B>(b, 2, &device);
        // Shape mismatches are caught before anything moves.
        let wrong_hidden = floats::<B>(&[0.0; 5 * 4], [5, 4], &device);
        assert!(matches!(
            group.dispatch(wrong_hidden, idx.clone(), w.clone()),
            Err(EpError::ShapeMismatch { what, .. }) if what == "x"
        ));
        let short_weights = floats::<B>(&b.topk_weights[..8], [4, 2], &device);
        assert!(matches!(
            group.dispatch(x.clone(), idx.clone(), short_weights),
            Err(EpError::ShapeMismatch { what, .. }) if what == "topk_weights"
        ));
        let too_many = floats::<B>(&[0.0; 7 * 3], [7, 3], &device);
        let too_many_idx = ints::<B>(&[-1; 14], [7, 2], &device);
        let too_many_w = floats::<B>(&[0.0; 14], [7, 2], &device);
        assert!(matches!(
            group.dispatch(too_many, too_many_idx, too_many_w),
            Err(EpError::TooManyTokens {
                tokens: 7,
                max: 6,
                ..
            })
        ));

        let d = group.dispatch(x, idx, w)?;
        // A replay whose token count or hidden size differs from its handle.
        let fewer = floats::<B>(&b.x[..4 * 3], [4, 3], &device);
        assert!(matches!(
            group.dispatch_cached(fewer, &d.routing),
            Err(EpError::ReplayMismatch { what, .. }) if what == "x row count"
        ));
        let wider = floats::<B>(&[0.0; 5 * 4], [5, 4], &device);
        assert!(matches!(
            group.dispatch_cached(wider, &d.routing),
            Err(EpError::ReplayMismatch { what, .. }) if what == "x hidden size"
        ));
        let rows = d.routing.padded_rows();
        let y_short = floats::<B>(&vec![0.0; (rows + 1) * 3], [rows + 1, 3], &device);
        assert!(matches!(
            group.combine(y_short, &d.routing),
            Err(EpError::ReplayMismatch { what, .. }) if what == "y row count"
        ));
        // The group still works after the errors: nothing moved for them.
        let y = d.rows.clone();
        group.combine(y, &d.routing).map(|_| ())
    });
    for r in results {
        r.unwrap();
    }
}

#[rstest]
fn bad_input_gives_clear_errors(#[values(Which::NdArray, Which::Cube)] which: Which) {
    on(which, errors::<NdArray>, errors::<Cube>);
}

/// A world of 0 is refused before any rank starts, not run as nothing.
#[test]
fn runners_refuse_an_empty_world() {
    let config = EpConfig::new(0, 4, 1, 8);
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let result = burn_ep::run_ranks::<NdArray, (), _, _>(
        burn_ep::Transport::Local,
        &options(),
        &config,
        |_, _| Default::default(),
        |_| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        },
    );
    assert!(
        matches!(&result, Err(EpError::InvalidConfig(m)) if m.contains("world_size")),
        "{result:?}"
    );
    let launched = burn_ep::launch::<NdArray, (), _, _>(
        &options(),
        &config,
        |_, _| Default::default(),
        |_| Ok(()),
    );
    assert!(matches!(launched, Err(EpError::InvalidConfig(m)) if m.contains("world_size")));
    assert_eq!(ran.into_inner(), 0);
}

/// What each operation makes, as the library counts it (the bench prints the same):
/// a recording dispatch makes one message of counts (the pairing check rides in
/// it) and one checked exchange carrying rows, weights and expert ids together; a
/// replay and a combine make one checked exchange each. Host synchronisations
/// depend on the backend (NdArray reads its inputs on the host), so only the
/// CubeCL backend's are pinned: the layout's count read and, on the local
/// transport, one read per plane sent (three for a recording dispatch).
#[rstest]
fn operations_make_the_counted_messages_and_exchanges(
    #[values(Which::NdArray, Which::Cube, Which::Fused)] which: Which,
) {
    if !runs_here(which) {
        return;
    }
    match which {
        Which::NdArray => counted::<NdArray>(Default::default(), false),
        Which::Cube => counted::<Cube>(Default::default(), true),
        Which::Fused => counted::<Fused>(Default::default(), true),
    }
}

fn counted<B: ExpertParallelBackend>(device: B::Device, check_syncs: bool) {
    use burn_ep::counters::{snapshot, Counts};
    let config = EpConfig::new(2, 4, 2, 8);
    let batches = synthetic_batches(
        &config,
        6,
        RoutingPattern::Uniform,
        SentinelPattern::None,
        11,
    );
    let counts = run_group_on::<B, _, _>(burn_ep::Transport::Local, &config, &device, |group| {
        let (x, idx, w) = inputs::<B>(&batches[group.rank()], config.top_k, &device);
        let counted = |f: &mut dyn FnMut() -> ep_core::EpResult<()>| {
            let before = snapshot();
            f().map(|_| snapshot() - before)
        };
        let mut routing = None;
        let record = counted(&mut || {
            routing = Some(group.dispatch(x.clone(), idx.clone(), w.clone())?);
            Ok(())
        })?;
        let d = routing.expect("recorded");
        let replay = counted(&mut || group.dispatch_cached(x.clone(), &d.routing).map(|_| ()))?;
        let combine = counted(&mut || group.combine(d.rows.clone(), &d.routing).map(|_| ()))?;
        Ok([record, replay, combine])
    });
    for (rank, result) in counts.into_iter().enumerate() {
        let [record, replay, combine] = result.unwrap();
        let messages = |c: Counts| (c.control_messages, c.exchanges);
        assert_eq!(messages(record), (2, 1), "rank {rank}: recording dispatch");
        assert_eq!(messages(replay), (1, 1), "rank {rank}: cached dispatch");
        assert_eq!(messages(combine), (1, 1), "rank {rank}: combine");
        if check_syncs {
            // Every rank sends rows in every exchange here (uniform routing).
            assert_eq!(record.host_syncs, 4, "rank {rank}: recording dispatch");
            assert_eq!(replay.host_syncs, 1, "rank {rank}: cached dispatch");
            assert_eq!(combine.host_syncs, 1, "rank {rank}: combine");
        }
    }
}

/// `Fused`, the backend of the `Fused` cases, is Burn's fusion backend over `Cube`,
/// which is what `burn::backend::Wgpu` (`Cuda`) is with Burn's default features.
#[test]
fn the_fused_cases_run_on_burns_fusion_backend() {
    let name = std::any::type_name::<Fused>();
    assert!(
        name.starts_with("burn_fusion::backend::Fusion<burn_cubecl::backend::CubeBackend<"),
        "{name}"
    );
    assert_eq!(
        name,
        format!(
            "burn_fusion::backend::Fusion<{}>",
            std::any::type_name::<Cube>()
        )
    );
}
