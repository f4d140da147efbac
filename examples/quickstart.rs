//! Dispatch and combine over 4 simulated ranks on the CPU, checked against the
//! plain-Rust reference, printing what moved where.
//!
//!     cargo run --release --example quickstart

use std::time::Duration;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use burn_ep::{run_ranks, EpConfig, EpGroup, RunOptions, Transport};
use ep_core::reference;
use ep_core::synthetic::{synthetic_batches, RoutingPattern, SentinelPattern};

type B = NdArray<f32>;

fn main() {
    // 4 ranks, 16 experts (4 per rank), top-4, hidden 64, groups padded to 8 rows.
    let config = EpConfig::new(4, 16, 4, 64).with_expert_alignment(8);
    let tokens = 32;
    let batches = synthetic_batches(
        &config,
        tokens,
        RoutingPattern::Skewed,
        SentinelPattern::RandomTenth,
        42,
    );
    let device = Default::default();

    let options = RunOptions::default().with_timeout(Duration::from_secs(30));
    let results = run_ranks(
        Transport::Local,
        &options,
        &config,
        |_, _| device,
        |group: EpGroup<B>| {
            let b = &batches[group.rank()];
            let tensor = |v: &[f32], cols| {
                Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [b.tokens, cols]), &device)
            };
            let x = tensor(&b.x, config.hidden_size);
            let w = tensor(&b.topk_weights, config.top_k);
            let idx = Tensor::from_data(
                TensorData::new(b.topk_idx.clone(), [b.tokens, config.top_k]),
                &device,
            );

            let d = group.dispatch(x, idx, w)?;
            // Identity experts: combine then gives every token sum_k w_k x.
            let out = group.combine(d.rows.clone(), &d.routing)?;
            let (rows, out) = (host(d.rows), host(out));
            Ok((
                d.routing.send_counts().to_vec(),
                d.routing.recv_counts().to_vec(),
                d.expert_counts,
                rows,
                out,
            ))
        },
    )
    .expect("the ranks start");

    let expected = reference::dispatch(&config, &batches).expect("valid synthetic routing");
    let routings: Vec<_> = expected.iter().map(|e| e.routing.clone()).collect();
    let outputs: Vec<Vec<f32>> = expected.iter().map(|e| e.rows.clone()).collect();
    let combined = reference::combine(&config, &batches, &routings, &outputs);

    println!(
        "burn-ep quickstart: {} ranks, {} experts, top-{}, {} tokens per rank, hidden {}",
        config.world_size, config.num_experts, config.top_k, tokens, config.hidden_size
    );
    println!(
        "{:>4}  {:<22} {:<22} rows per local expert",
        "rank", "tokens sent to rank", "rows received from"
    );
    let mut all_match = true;
    for (rank, result) in results.into_iter().enumerate() {
        let (sent, received, counts, rows, out) = result.expect("rank failed");
        let matches = rows == expected[rank].rows && out == combined[rank];
        all_match &= matches;
        println!(
            "{rank:>4}  {:<22} {:<22} {:?} {}",
            format!("{sent:?}"),
            format!("{received:?}"),
            counts,
            if matches {
                "== reference"
            } else {
                "!= reference"
            }
        );
    }
    if !all_match {
        eprintln!("MISMATCH against the reference");
        std::process::exit(1);
    }
    println!("dispatch and combine equal the ep-core reference on every rank");
}

/// A tensor's values. A rank that receives nothing has `[0, H]` rows, and a
/// zero-size tensor is not read: there is nothing in it, and on CUDA Burn 0.21's
/// read of one fails (see the book's contract chapter).
fn host(t: Tensor<B, 2>) -> Vec<f32> {
    if t.shape().num_elements() == 0 {
        return Vec::new();
    }
    t.into_data().to_vec().unwrap()
}
