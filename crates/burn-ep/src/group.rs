//! `EpGroup`: dispatch, cached dispatch and combine for one rank of a group.

use burn::tensor::{DType, Int, Tensor, TensorData};
use ep_core::padding::sp_padded_tokens;
use ep_core::{validate, EpConfig, EpError, EpResult};
use ep_mesh::LocalComm;

use crate::backend::{float, int, ExpertParallelBackend, PackMeta};
use crate::routing::Routing;
use crate::transfer::{concat_rows, split_rows};

/// What a recording dispatch returns.
#[derive(Debug, Clone)]
pub struct Dispatched<B: ExpertParallelBackend> {
    /// `[padded rows, hidden]`: rows grouped by local expert, each group padded to
    /// the expert alignment with zero rows.
    pub rows: Tensor<B, 2>,
    /// Rows per local expert, before padding.
    pub expert_counts: Vec<usize>,
    /// The handle that cached dispatch and combine replay.
    pub routing: Routing<B>,
}

/// One rank's member of an expert-parallel group.
pub struct EpGroup<B: ExpertParallelBackend> {
    config: EpConfig,
    comm: LocalComm,
    device: B::Device,
}

/// What a rank tells each peer in the count exchange.
struct Counts {
    rows: usize,
    /// Rows for each of the peer's local experts.
    per_expert: Vec<usize>,
}

impl<B: ExpertParallelBackend> EpGroup<B> {
    /// Joins a group: `config.world_size` must match the transport's, and the rank
    /// is taken from the transport.
    pub fn new(config: EpConfig, comm: LocalComm, device: B::Device) -> EpResult<Self> {
        if config.world_size != comm.world_size() {
            return Err(EpError::InvalidConfig(format!(
                "config.world_size is {} but the transport has {} ranks",
                config.world_size,
                comm.world_size()
            )));
        }
        let config = config.with_rank(comm.rank());
        config.validate()?;
        Ok(Self {
            config,
            comm,
            device,
        })
    }

    pub fn config(&self) -> &EpConfig {
        &self.config
    }

    pub fn rank(&self) -> usize {
        self.config.rank
    }

    pub fn world_size(&self) -> usize {
        self.config.world_size
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Sends every token to the ranks that hold its experts and returns the rows
    /// grouped by local expert, with the routing handle.
    ///
    /// `x` is `[T, H]`, `topk_idx` `[T, K]` global expert ids or `-1`, `topk_weights`
    /// `[T, K]`. Bad ids, shapes, devices or too many tokens are errors, found on
    /// each rank before any data moves.
    pub fn dispatch(
        &self,
        x: Tensor<B, 2>,
        topk_idx: Tensor<B, 2, Int>,
        topk_weights: Tensor<B, 2>,
    ) -> EpResult<Dispatched<B>> {
        let c = &self.config;
        let [tokens, _] = x.dims();
        validate::check_shape("x", &[tokens, c.hidden_size], &x.dims())?;
        validate::check_shape("topk_idx", &[tokens, c.top_k], &topk_idx.dims())?;
        validate::check_shape("topk_weights", &[tokens, c.top_k], &topk_weights.dims())?;
        validate::check_token_count(c, tokens)?;
        self.check_device("x", &x.device())?;
        self.check_device("topk_idx", &topk_idx.device())?;
        self.check_device("topk_weights", &topk_weights.device())?;
        let dtype = x.dtype();

        // Sequence-parallel padding: pad rows name no expert, so they move nothing.
        let padded_tokens = sp_padded_tokens(tokens, c.sp_size);
        let x = pad_rows(x, padded_tokens, 0.0);
        let topk_weights = pad_rows(topk_weights, padded_tokens, 0.0);
        let topk_idx = pad_int_rows(topk_idx, padded_tokens, -1);

        let (slots, send_counts, tokens_per_expert) = if padded_tokens > 0 {
            let layout = B::ep_layout(topk_idx.clone().into_primitive(), c)?;
            let slots: Tensor<B, 2, Int> = int(layout.slots);
            (Some(slots), layout.send_counts, layout.tokens_per_expert)
        } else {
            (None, vec![0; c.world_size], vec![0; c.num_experts])
        };

        // Count exchange: rows, and rows per expert, that each rank will receive.
        let local = c.experts_per_rank();
        let counts = send_counts
            .iter()
            .enumerate()
            .map(|(d, &rows)| Counts {
                rows,
                per_expert: tokens_per_expert[d * local..(d + 1) * local].to_vec(),
            })
            .collect();
        let received = self.comm.all_to_all(counts)?;
        let recv_counts: Vec<usize> = received.iter().map(|m| m.rows).collect();
        let expert_counts: Vec<usize> = (0..local)
            .map(|j| received.iter().map(|m| m.per_expert[j]).sum())
            .collect();
        let mut expert_offsets = vec![0];
        for &count in &expert_counts {
            expert_offsets.push(expert_offsets.last().unwrap() + c.aligned(count));
        }
        let padded_rows = *expert_offsets.last().unwrap();

        // Pack rows, weights and destination-local expert ids; move them.
        let sent: usize = send_counts.iter().sum();
        let packed = slots.as_ref().filter(|_| sent > 0).map(|slots| {
            let meta = PackMeta {
                topk_idx: topk_idx.into_primitive(),
                topk_weights: topk_weights.into_primitive().tensor(),
                experts_per_rank: local,
            };
            let (rows, meta) = B::ep_pack(
                x.into_primitive().tensor(),
                slots.clone().into_primitive(),
                sent,
                Some(meta),
            );
            let (weights, local_ids) = meta.expect("a recording pack returns its metadata");
            vec![
                float::<B, 2>(rows).into_data(),
                float::<B, 2>(weights).into_data(),
                int::<B, 2>(local_ids).into_data(),
            ]
        });
        let mut parts = self.exchange(packed, &send_counts, 3)?.into_iter();
        let (recv_rows, recv_weights, recv_local) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );

        // Expand to expert-major rows.
        let (positions, recv_weights, rows, row_weights) =
            match (recv_rows, recv_weights, recv_local) {
                (Some(rows), Some(weights), Some(local_ids)) => {
                    let local_ids: Tensor<B, 2, Int> = self.upload_int(local_ids);
                    let positions = int::<B, 2>(B::ep_expert_positions(
                        local_ids.into_primitive(),
                        &expert_offsets[..local],
                    ));
                    let rows: Tensor<B, 2> = self.upload(rows);
                    let weights: Tensor<B, 2> = self.upload(weights);
                    let expanded = B::ep_expand(
                        rows.into_primitive().tensor(),
                        positions.clone().into_primitive(),
                        padded_rows,
                    );
                    let row_weights = B::ep_expand_weights(
                        weights.clone().into_primitive().tensor(),
                        positions.clone().into_primitive(),
                        padded_rows,
                    );
                    (
                        Some(positions),
                        Some(weights),
                        float::<B, 2>(expanded),
                        float::<B, 1>(row_weights),
                    )
                }
                _ => (
                    None,
                    None,
                    Tensor::zeros([0, c.hidden_size], (&self.device, dtype)),
                    Tensor::zeros([0], (&self.device, dtype)),
                ),
            };

        let routing = Routing {
            tokens,
            padded_tokens,
            hidden: c.hidden_size,
            world_size: c.world_size,
            dtype,
            device: self.device.clone(),
            send_counts,
            recv_counts,
            tokens_per_expert,
            expert_counts: expert_counts.clone(),
            expert_offsets,
            slots,
            positions,
            recv_weights,
            row_weights,
        };
        Ok(Dispatched {
            rows,
            expert_counts,
            routing,
        })
    }

    /// Replays `routing` with a new payload `x` (`[T, H]`, the T of the handle): the
    /// same rows go to the same places, with no layout and no count exchange.
    pub fn dispatch_cached(&self, x: Tensor<B, 2>, routing: &Routing<B>) -> EpResult<Tensor<B, 2>> {
        self.check_handle(routing)?;
        routing.check_payload("x", routing.tokens, x.dims(), x.dtype(), &x.device())?;
        let x = pad_rows(x, routing.padded_tokens, 0.0);
        let packed = routing
            .slots
            .as_ref()
            .filter(|_| routing.sent_rows() > 0)
            .map(|slots| {
                let (rows, _) = B::ep_pack(
                    x.into_primitive().tensor(),
                    slots.clone().into_primitive(),
                    routing.sent_rows(),
                    None,
                );
                vec![float::<B, 2>(rows).into_data()]
            });
        let received = self
            .exchange(packed, &routing.send_counts, 1)?
            .pop()
            .unwrap();
        Ok(match (received, &routing.positions) {
            (Some(rows), Some(positions)) => {
                let rows: Tensor<B, 2> = self.upload(rows);
                float(B::ep_expand(
                    rows.into_primitive().tensor(),
                    positions.clone().into_primitive(),
                    routing.padded_rows(),
                ))
            }
            _ => Tensor::zeros([0, routing.hidden], (&self.device, routing.dtype)),
        })
    }

    /// Sends the expert outputs `y` (`[padded rows, H]`, the expert-major layout of
    /// `routing`) back to their tokens: each rank first sums its local experts'
    /// outputs weighted by the top-k weights, then each token sums what comes back
    /// from each rank, in rank order. Returns `[T, H]`.
    pub fn combine(&self, y: Tensor<B, 2>, routing: &Routing<B>) -> EpResult<Tensor<B, 2>> {
        self.check_handle(routing)?;
        routing.check_payload("y", routing.padded_rows(), y.dims(), y.dtype(), &y.device())?;
        let (hidden, dtype) = (routing.hidden, y.dtype());
        let partial = match (&routing.positions, &routing.recv_weights) {
            (Some(positions), Some(weights)) => {
                let reduced = B::ep_reduce(
                    y.into_primitive().tensor(),
                    positions.clone().into_primitive(),
                    weights.clone().into_primitive().tensor(),
                );
                Some(vec![float::<B, 2>(reduced).into_data()])
            }
            _ => None,
        };
        // Back along the route: what was received from a rank returns to it.
        let back = self
            .exchange(partial, &routing.recv_counts, 1)?
            .pop()
            .unwrap();
        let out = match (back, &routing.slots) {
            (Some(back), Some(slots)) => {
                let back: Tensor<B, 2> = self.upload(back);
                float::<B, 2>(B::ep_sum(
                    back.into_primitive().tensor(),
                    slots.clone().into_primitive(),
                ))
            }
            _ => Tensor::zeros([routing.padded_tokens, hidden], (&self.device, dtype)),
        };
        Ok(match routing.tokens {
            t if t == routing.padded_tokens => out,
            0 => Tensor::zeros([0, hidden], (&self.device, dtype)),
            t => out.narrow(0, 0, t),
        })
    }

    /// The all-to-all-v of row segments. `parts` are buffers with one row per sent
    /// row (rows, weights, ids ...), split by `send_counts`; returns each part's
    /// received rows, concatenated in source-rank order (`None` when nothing came).
    fn exchange(
        &self,
        parts: Option<Vec<TensorData>>,
        send_counts: &[usize],
        num_parts: usize,
    ) -> EpResult<Vec<Option<TensorData>>> {
        let world = self.config.world_size;
        let mut messages: Vec<Vec<Option<TensorData>>> = vec![Vec::new(); world];
        match parts {
            Some(parts) => {
                for part in &parts {
                    for (message, block) in messages.iter_mut().zip(split_rows(part, send_counts)) {
                        message.push(block);
                    }
                }
            }
            None => messages.iter_mut().for_each(|m| m.resize(num_parts, None)),
        }
        let received = self.comm.all_to_all(messages)?;
        Ok((0..num_parts)
            .map(|p| concat_rows(received.iter().filter_map(|m| m[p].clone()).collect()))
            .collect())
    }

    fn upload(&self, data: TensorData) -> Tensor<B, 2> {
        let dtype = data.dtype;
        Tensor::from_data(data, (&self.device, dtype))
    }

    fn upload_int(&self, data: TensorData) -> Tensor<B, 2, Int> {
        Tensor::from_data(data, &self.device)
    }

    fn check_handle(&self, routing: &Routing<B>) -> EpResult<()> {
        if routing.world_size != self.config.world_size {
            return Err(EpError::ReplayMismatch {
                what: "world size".into(),
                handle: routing.world_size.to_string(),
                got: self.config.world_size.to_string(),
            });
        }
        if routing.device != self.device {
            return Err(EpError::ReplayMismatch {
                what: "group device".into(),
                handle: format!("{:?}", routing.device),
                got: format!("{:?}", self.device),
            });
        }
        Ok(())
    }

    fn check_device(&self, what: &str, device: &B::Device) -> EpResult<()> {
        if device != &self.device {
            return Err(EpError::DeviceMismatch {
                what: what.to_string(),
                expected: format!("{:?}", self.device),
                got: format!("{device:?}"),
            });
        }
        Ok(())
    }
}

/// Pads `[T, C]` up to `rows` rows of `value`.
fn pad_rows<B: ExpertParallelBackend>(t: Tensor<B, 2>, rows: usize, value: f32) -> Tensor<B, 2> {
    let [n, cols] = t.dims();
    if n == rows {
        return t;
    }
    let dtype: DType = t.dtype();
    let pad = Tensor::full([rows - n, cols], value, (&t.device(), dtype));
    if n == 0 {
        return pad;
    }
    Tensor::cat(vec![t, pad], 0)
}

fn pad_int_rows<B: ExpertParallelBackend>(
    t: Tensor<B, 2, Int>,
    rows: usize,
    value: i64,
) -> Tensor<B, 2, Int> {
    let [n, cols] = t.dims();
    if n == rows {
        return t;
    }
    let pad = Tensor::full([rows - n, cols], value, &t.device());
    if n == 0 {
        return pad;
    }
    Tensor::cat(vec![t, pad], 0)
}
