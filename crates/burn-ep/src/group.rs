//! `EpGroup`: dispatch, cached dispatch and combine for one rank of a group.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use burn::tensor::{DType, Int, Tensor};
use ep_core::padding::sp_padded_tokens;
use ep_core::{validate, EpConfig, EpError, EpResult};
use ep_mesh::{open_call, Control, LocalComm};

use crate::backend::{float, int, zeros_tensor, DispatchLayout, ExpertParallelBackend, RoutePlan};
use crate::exchange::{ExchangeOp, ExchangeTag, RowExchange, SharedExchange};
use crate::routing::Routing;

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

/// What a rank-major dispatch returns ([`EpGroup::dispatch_rank_major`]): every
/// token that came to this rank once, with what its experts need to run on it.
#[derive(Debug, Clone)]
pub struct RankMajorDispatched<B: ExpertParallelBackend> {
    /// `[R, hidden]`: the received tokens in source-rank order, each source's in its
    /// token order.
    pub rows: Tensor<B, 2>,
    /// `[R, K]`: each received token's top-k slots as this rank's local expert ids
    /// (`0..experts per rank`), `-1` where the slot is another rank's expert or none.
    pub expert_ids: Tensor<B, 2, Int>,
    /// `[R, K]`: each received token's top-k weights, all `K` as the token sent them
    /// (on autodiff backends, differentiable in `topk_weights`). The slots whose id
    /// is `-1` belong to other ranks.
    pub weights: Tensor<B, 2>,
    /// Slots naming each local expert (the rows a grouped expert computation takes).
    pub expert_counts: Vec<usize>,
    /// The handle that cached dispatch and combine replay, in this layout.
    pub routing: Routing<B>,
}

/// One rank's member of an expert-parallel group.
///
/// Groups are made by the runners, [`run_ranks`](crate::run_ranks) and
/// [`launch`](crate::launch), which set up the transport and hand every rank its
/// group; there is no constructor to join one by hand:
///
/// ```compile_fail
/// use burn::backend::NdArray;
/// use burn_ep::{profiling::local_comms, EpConfig, EpGroup, DEFAULT_TIMEOUT};
///
/// let comm = local_comms(1, DEFAULT_TIMEOUT).remove(0);
/// let group = EpGroup::<NdArray>::new(EpConfig::new(1, 2, 1, 4), comm, Default::default());
/// ```
pub struct EpGroup<B: ExpertParallelBackend> {
    config: EpConfig,
    exchange: SharedExchange,
    device: B::Device,
    /// Recording dispatches so far: the next handle's number.
    handles: AtomicU64,
}

impl<B: ExpertParallelBackend> EpGroup<B> {
    /// Joins a group on the local transport: `config.world_size` must match the
    /// transport's, and the rank is taken from the transport.
    pub(crate) fn new(config: EpConfig, comm: LocalComm, device: B::Device) -> EpResult<Self> {
        Self::on(config, comm, device)
    }

    /// Joins a group on the cuda-peer transport (one process, one thread per rank):
    /// rows move between device buffers by peer copies. `device` must be the CUDA
    /// device the transport gave this rank.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_peer(
        config: EpConfig,
        comm: ep_mesh::CudaPeerComm,
        device: B::Device,
    ) -> EpResult<Self> {
        let control = comm.control().clone();
        Self::with_transport(config, control, Arc::new(comm), device)
    }

    /// Joins a group on the nccl transport: one NCCL communicator per rank, in this
    /// process or across processes and nodes. `device` must be the CUDA device the
    /// communicator was made on.
    #[cfg(feature = "cuda")]
    pub(crate) fn nccl(
        config: EpConfig,
        comm: ep_mesh::NcclComm,
        device: B::Device,
    ) -> EpResult<Self> {
        Self::on(config, comm, device)
    }

    /// Joins a hierarchical group: device copies between the ranks of this process,
    /// NCCL to the others (see `ep_mesh::hierarchical`).
    #[cfg(feature = "cuda")]
    pub(crate) fn hierarchical(
        config: EpConfig,
        comm: ep_mesh::HierarchicalComm,
        device: B::Device,
    ) -> EpResult<Self> {
        Self::on(config, comm, device)
    }

    /// A transport that carries both the control messages and the rows.
    fn on<T: Control + RowExchange + 'static>(
        config: EpConfig,
        comm: T,
        device: B::Device,
    ) -> EpResult<Self> {
        let comm = Arc::new(comm);
        Self::with_transport(config, comm.clone(), comm, device)
    }

    /// `control` carries the count exchange, checks and barriers, `rows` the rows.
    fn with_transport(
        config: EpConfig,
        control: Arc<dyn Control>,
        rows: Arc<dyn RowExchange>,
        device: B::Device,
    ) -> EpResult<Self> {
        if config.world_size != control.world_size() {
            return Err(EpError::InvalidConfig(format!(
                "config.world_size is {} but the transport has {} ranks",
                config.world_size,
                control.world_size()
            )));
        }
        let config = config.with_rank(control.rank());
        config.validate()?;
        Ok(Self {
            exchange: SharedExchange::new(control, rows, opening_words(&config)),
            config,
            device,
            handles: AtomicU64::new(0),
        })
    }

    /// The group's configuration, with this rank's number in it.
    pub fn config(&self) -> &EpConfig {
        &self.config
    }

    /// This rank's number in the group, `0..world_size`.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// How many ranks the group has.
    pub fn world_size(&self) -> usize {
        self.config.world_size
    }

    /// The device this rank's tensors must be on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The transport that moves this group's rows, for callers that run the steps
    /// themselves (the benchmark's breakdown). Machinery, not API.
    #[doc(hidden)]
    pub fn exchange(&self) -> &SharedExchange {
        &self.exchange
    }

    /// Sums `values` over the ranks of the group, in rank order (so every rank gets
    /// bitwise the same result): the all-reduce of dense gradients and loads.
    pub fn all_reduce_sum(&self, values: Vec<f32>) -> EpResult<Vec<f32>> {
        self.check_group_call(ExchangeOp::AllReduce, values.len())?;
        self.exchange.control().all_reduce_sum(&values)
    }

    /// Returns once every rank of the group has called it (or with the error that
    /// a failed or silent peer gives).
    pub fn barrier(&self) -> EpResult<()> {
        self.check_group_call(ExchangeOp::Barrier, 0)
    }

    /// A step's error as the group reports it: a device failure ends this rank's
    /// part in the group (see `SharedExchange::device_failed`).
    fn settle(&self, error: EpError) -> EpError {
        match error {
            EpError::DeviceFailed { reason, .. } => self.exchange.device_failed(reason),
            other => other,
        }
    }

    /// Checks that every rank makes the same group call, with the same length.
    fn check_group_call(&self, op: ExchangeOp, len: usize) -> EpResult<()> {
        let world = self.config.world_size;
        self.exchange.check_pairing(
            ExchangeTag::new(0, op),
            &vec![len; world],
            &vec![len; world],
        )
    }

    /// Sends every token to the ranks that hold its experts and returns the rows
    /// grouped by local expert, with the routing handle.
    ///
    /// `x` is `[T, H]`, `topk_idx` `[T, K]` global expert ids or `-1`, `topk_weights`
    /// `[T, K]`. Bad ids, shapes, devices or too many tokens are errors, found on
    /// each rank before any data moves. On an autodiff backend the rows are
    /// differentiable in `x` and the handle's weights in `topk_weights`.
    ///
    /// # Example
    ///
    /// Two ranks as threads of this process, on the CPU. The experts here are the
    /// identity, so the combine gives every token the weighted sum of its own row.
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::{Distribution, Int, Tensor, TensorData};
    /// use burn_ep::{run_ranks, EpConfig, EpGroup, RunOptions, Transport};
    ///
    /// type B = NdArray<f32>;
    /// // 2 ranks, 4 experts (2 on each rank), top-2, hidden 8.
    /// let config = EpConfig::new(2, 4, 2, 8);
    /// let results = run_ranks(Transport::Local, &RunOptions::default(), &config,
    ///     |_, _| Default::default(),
    ///     |group: EpGroup<B>| {
    ///         let device = group.device().clone();
    ///         let x = Tensor::<B, 2>::random([3, 8], Distribution::Default, &device);
    ///         // Token t chooses experts t and t + 1, weighted 0.75 and 0.25.
    ///         let ids = TensorData::new(vec![0i64, 1, 1, 2, 2, 3], [3, 2]);
    ///         let topk_idx = Tensor::<B, 2, Int>::from_data(ids, &device);
    ///         let topk_weights = Tensor::<B, 2>::from_data([[0.75, 0.25]; 3], &device);
    ///
    ///         let d = group.dispatch(x.clone(), topk_idx, topk_weights)?;
    ///         // d.rows holds this rank's rows, grouped by local expert at
    ///         // d.routing.expert_offsets(); the experts would run on them here.
    ///         let out = group.combine(d.rows, &d.routing)?;
    ///
    ///         Ok((out - x).abs().max().into_scalar())
    ///     },
    /// )?;
    /// for error in results {
    ///     assert!(error? < 1e-6);
    /// }
    /// # Ok::<(), burn_ep::EpError>(())
    /// ```
    pub fn dispatch(
        &self,
        x: Tensor<B, 2>,
        topk_idx: Tensor<B, 2, Int>,
        topk_weights: Tensor<B, 2>,
    ) -> EpResult<Dispatched<B>> {
        let (rows, _, routing) =
            self.record(x, topk_idx, topk_weights, DispatchLayout::ExpertMajor)?;
        Ok(Dispatched {
            rows,
            expert_counts: routing.expert_counts.clone(),
            routing,
        })
    }

    /// Sends every token once to each rank that holds any of its top-k experts and
    /// returns them as they arrive, rank-major, with their local expert ids and
    /// weights, like DeepEP's normal dispatch: no token is copied per expert, and
    /// the caller groups the rows by expert as its expert computation needs.
    ///
    /// Inputs and errors are those of [`Self::dispatch`]. The handle replays in this
    /// layout: [`Self::dispatch_cached`] returns `[R, H]` rows, and [`Self::combine`]
    /// takes one row per received token (the caller's weighted sum over this rank's
    /// experts) and sums each token's rows over the ranks, in rank order.
    pub fn dispatch_rank_major(
        &self,
        x: Tensor<B, 2>,
        topk_idx: Tensor<B, 2, Int>,
        topk_weights: Tensor<B, 2>,
    ) -> EpResult<RankMajorDispatched<B>> {
        let c = &self.config;
        let (rows, received, routing) =
            self.record(x, topk_idx, topk_weights, DispatchLayout::RankMajor)?;
        let (weights, expert_ids) = received.unwrap_or_else(|| {
            (
                zeros_tensor::<B, 2>([0, c.top_k], &self.device, routing.dtype),
                Tensor::<B, 2, Int>::empty([0, c.top_k], &self.device),
            )
        });
        Ok(RankMajorDispatched {
            rows,
            expert_ids,
            weights,
            expert_counts: routing.expert_counts.clone(),
            routing,
        })
    }

    /// A recording dispatch in `layout`: the rows, the received weights and local
    /// expert ids (`None` when nothing came), and the handle.
    #[allow(clippy::type_complexity)]
    fn record(
        &self,
        x: Tensor<B, 2>,
        topk_idx: Tensor<B, 2, Int>,
        topk_weights: Tensor<B, 2>,
        layout: DispatchLayout,
    ) -> EpResult<(
        Tensor<B, 2>,
        Option<(Tensor<B, 2>, Tensor<B, 2, Int>)>,
        Routing<B>,
    )> {
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

        // Layout and slots.
        let (slots, send_counts, tokens_per_expert) = if padded_tokens > 0 {
            let layout =
                B::ep_layout(topk_idx.clone().into_primitive(), c).map_err(|e| self.settle(e))?;
            (
                Some(layout.slots),
                layout.send_counts,
                layout.tokens_per_expert,
            )
        } else {
            (None, vec![0; c.world_size], vec![0; c.num_experts])
        };

        // Count exchange: rows, and rows per expert, that each rank will receive.
        let handle = self.handles.fetch_add(1, Ordering::Relaxed);
        let local = c.experts_per_rank();
        let received = self.exchange_counts(handle, &send_counts, &tokens_per_expert)?;
        let recv_counts: Vec<usize> = received.iter().map(|m| m[0] as usize).collect();
        let expert_counts: Vec<usize> = (0..local)
            .map(|j| received.iter().map(|m| m[1 + j] as usize).sum())
            .collect();
        let expert_offsets = c.expert_offsets(&expert_counts);
        // Alignment padding: the rows after each expert's own, up to the next group.
        let (padded_rows, pads): (usize, Vec<u32>) = match layout {
            DispatchLayout::RankMajor => (recv_counts.iter().sum(), Vec::new()),
            DispatchLayout::ExpertMajor => (
                *expert_offsets.last().unwrap(),
                (0..local)
                    .flat_map(|j| expert_offsets[j] + expert_counts[j]..expert_offsets[j + 1])
                    .map(|row| row as u32)
                    .collect(),
            ),
        };

        let mut plan = RoutePlan {
            handle,
            tokens: padded_tokens,
            send_counts,
            recv_counts,
            layout,
            padded_rows,
            pads,
            device: self.device.clone(),
            slots,
            positions: None,
        };
        // The payload, the weights and the expert ids move in one exchange; the
        // rows and the weights are differentiable.
        let (rows, received) = B::ep_record_route(
            x.into_primitive().tensor(),
            topk_weights.into_primitive().tensor(),
            topk_idx.into_primitive(),
            &expert_offsets[..local],
            &mut plan,
            &self.exchange,
        )?;
        let rows = float::<B, 2>(rows);
        let received = received.map(|(w, ids)| (float::<B, 2>(w), int::<B, 2>(ids)));
        let recv_weights = received.as_ref().map(|(w, _)| w.clone());
        let row_weights = match (&recv_weights, &plan.positions) {
            (Some(w), Some(positions)) => float::<B, 1>(B::ep_expand_weights(
                w.clone().detach().into_primitive().tensor(),
                positions.clone(),
                padded_rows,
                &plan.pads,
            )),
            // Rank-major rows have no one weight each: the handle holds none.
            _ if layout == DispatchLayout::RankMajor => {
                zeros_tensor::<B, 1>([0], &self.device, dtype)
            }
            _ => zeros_tensor::<B, 1>([padded_rows], &self.device, dtype),
        };

        let routing = Routing {
            tokens,
            hidden: c.hidden_size,
            world_size: c.world_size,
            dtype,
            tokens_per_expert,
            expert_counts,
            expert_offsets,
            plan,
            recv_weights,
            row_weights,
        };
        Ok((rows, received, routing))
    }

    /// Replays `routing` with a new payload `x` (`[T, H]`, the T of the handle): the
    /// same rows go to the same places, with no layout and no count exchange. The
    /// rows come in the handle's layout (expert-major `[padded rows, H]`, or
    /// rank-major `[R, H]`).
    ///
    /// # Example
    ///
    /// A second payload (the gradient of a layer, say) along the route that the
    /// first dispatch recorded: the same as dispatching it with the same choice.
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::{Distribution, Int, Tensor, TensorData};
    /// use burn_ep::{run_ranks, EpConfig, EpGroup, RunOptions, Transport};
    ///
    /// type B = NdArray<f32>;
    /// let config = EpConfig::new(2, 4, 2, 8);
    /// let results = run_ranks(Transport::Local, &RunOptions::default(), &config,
    ///     |_, _| Default::default(),
    ///     |group: EpGroup<B>| {
    ///         let device = group.device().clone();
    ///         let random = || Tensor::<B, 2>::random([3, 8], Distribution::Default, &device);
    ///         let ids = TensorData::new(vec![0i64, 3, 1, 2, 2, -1], [3, 2]);
    ///         let topk_idx = Tensor::<B, 2, Int>::from_data(ids, &device);
    ///         let topk_weights = Tensor::<B, 2>::from_data([[0.5, 0.5]; 3], &device);
    ///         let (x, x2) = (random(), random());
    ///
    ///         let d = group.dispatch(x, topk_idx.clone(), topk_weights.clone())?;
    ///         let replayed = group.dispatch_cached(x2.clone(), &d.routing)?;
    ///
    ///         let recorded = group.dispatch(x2, topk_idx, topk_weights)?.rows;
    ///         Ok(replayed.equal(recorded).all().into_scalar())
    ///     },
    /// )?;
    /// for same in results {
    ///     assert!(same?);
    /// }
    /// # Ok::<(), burn_ep::EpError>(())
    /// ```
    pub fn dispatch_cached(&self, x: Tensor<B, 2>, routing: &Routing<B>) -> EpResult<Tensor<B, 2>> {
        self.check_handle(routing)?;
        routing.check_payload("x", routing.tokens, x.dims(), x.dtype(), &x.device())?;
        let x = pad_rows(x, routing.plan.tokens, 0.0);
        Ok(float(B::ep_dispatch_rows(
            x.into_primitive().tensor(),
            &routing.plan,
            &self.exchange,
        )?))
    }

    /// Sends the expert outputs `y` back to their tokens; returns `[T, H]`.
    /// - Expert-major handle: `y` is `[padded rows, H]`; each rank first sums its
    ///   local experts' outputs weighted by the top-k weights.
    /// - Rank-major handle: `y` is `[R, H]`, one row per received token, already
    ///   weighted and summed over this rank's experts by the caller.
    ///
    /// Then each token sums what comes back from each rank, in rank order.
    ///
    /// # Example
    ///
    /// Rank-major, with experts that double their rows: each rank sums its own
    /// experts' outputs per received token (here `2 x` times the token's weights on
    /// this rank), and the combine adds the ranks' sums, so every token gets `2 x`.
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::{Distribution, Int, Tensor, TensorData};
    /// use burn_ep::{run_ranks, EpConfig, EpGroup, RunOptions, Transport};
    ///
    /// type B = NdArray<f32>;
    /// let config = EpConfig::new(2, 4, 2, 8);
    /// let results = run_ranks(Transport::Local, &RunOptions::default(), &config,
    ///     |_, _| Default::default(),
    ///     |group: EpGroup<B>| {
    ///         let device = group.device().clone();
    ///         let x = Tensor::<B, 2>::random([3, 8], Distribution::Default, &device);
    ///         let ids = TensorData::new(vec![0i64, 3, 1, 2, 2, 0], [3, 2]);
    ///         let topk_idx = Tensor::<B, 2, Int>::from_data(ids, &device);
    ///         let topk_weights = Tensor::<B, 2>::from_data([[0.5, 0.5]; 3], &device);
    ///
    ///         let d = group.dispatch_rank_major(x.clone(), topk_idx, topk_weights)?;
    ///         // [R, K] each: the received tokens' slots as local expert ids (-1 for
    ///         // another rank's expert) and their weights.
    ///         let here = d.expert_ids.clone().greater_equal_elem(0).float();
    ///         let on_this_rank = (d.weights.clone() * here).sum_dim(1);
    ///         let y = d.rows.clone() * 2.0 * on_this_rank;
    ///         let out = group.combine(y, &d.routing)?;
    ///
    ///         Ok((out - x * 2.0).abs().max().into_scalar())
    ///     },
    /// )?;
    /// for error in results {
    ///     assert!(error? < 1e-6);
    /// }
    /// # Ok::<(), burn_ep::EpError>(())
    /// ```
    pub fn combine(&self, y: Tensor<B, 2>, routing: &Routing<B>) -> EpResult<Tensor<B, 2>> {
        self.check_handle(routing)?;
        let rows = routing.plan.padded_rows;
        routing.check_payload("y", rows, y.dims(), y.dtype(), &y.device())?;
        let hidden = routing.hidden;
        let dtype = y.dtype();
        // Rank-major combine does not weigh, but takes the weights all the same: so
        // their backward runs on every rank, also where the caller's graph left
        // them out (a rank that received nothing), and the ranks' backward passes
        // stay paired.
        let weights = routing
            .recv_weights
            .clone()
            .map(|w| w.into_primitive().tensor());
        let out = float::<B, 2>(B::ep_combine_rows(
            y.into_primitive().tensor(),
            weights,
            &routing.plan,
            &self.exchange,
            ExchangeOp::Combine,
        )?);
        Ok(match routing.tokens {
            t if t == routing.plan.tokens => out,
            0 => zeros_tensor::<B, 2>([0, hidden], &self.device, dtype),
            t => out.narrow(0, 0, t),
        })
    }

    /// Tells each peer `[rows, rows for each of its local experts]` and returns what
    /// each peer will send here, after checking that every peer is recording the
    /// same handle (in the same message: the row counts are not known yet, so the
    /// check compares the calls only).
    fn exchange_counts(
        &self,
        handle: u64,
        send_counts: &[usize],
        tokens_per_expert: &[usize],
    ) -> EpResult<Vec<Vec<u64>>> {
        let world = self.config.world_size;
        let local = self.config.experts_per_rank();
        let tag = ExchangeTag::new(handle, ExchangeOp::Counts);
        self.exchange.check_healthy()?;
        let no_rows = vec![0; world];
        let counts = send_counts
            .iter()
            .enumerate()
            .map(|(d, &rows)| {
                let per_expert = &tokens_per_expert[d * local..(d + 1) * local];
                std::iter::once(rows)
                    .chain(per_expert.iter().copied())
                    .map(|n| n as u64)
                    .collect()
            })
            .collect();
        let pairing = self.exchange.pairing(tag, &no_rows, &no_rows);
        let received = open_call(self.exchange.control(), &pairing, counts)?;
        Ok(received
            .into_iter()
            .map(|mut words| {
                words.truncate(1 + local);
                words
            })
            .collect())
    }

    fn check_handle(&self, routing: &Routing<B>) -> EpResult<()> {
        if routing.world_size != self.config.world_size {
            return Err(EpError::ReplayMismatch {
                what: "world size".into(),
                handle: routing.world_size.to_string(),
                got: self.config.world_size.to_string(),
            });
        }
        if routing.plan.device != self.device {
            return Err(EpError::ReplayMismatch {
                what: "group device".into(),
                handle: format!("{:?}", routing.plan.device),
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

/// The length of the message that opens every call of a group (see
/// `ep_mesh::Pairing`): three words of pairing check, then the longest rest any
/// call sends, the count exchange's (rows, then rows per local expert) or a device
/// exchange's landing (address and length in each of up to three planes).
fn opening_words(config: &EpConfig) -> usize {
    3 + (1 + config.experts_per_rank()).max(2 * 3)
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

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use std::time::Duration;

    use burn::backend::NdArray;
    use ep_core::{EpConfig, EpError};

    use super::EpGroup;

    /// A group joins a transport of its own world size only. (The runners make the
    /// transport from the configuration; this guards a hand-made one.)
    #[test]
    fn world_size_must_match_the_transport() {
        let comms = ep_mesh::local_comms(2, Duration::from_secs(10));
        let config = EpConfig::new(4, 8, 2, 3);
        let comm = comms.into_iter().next().unwrap();
        let err = EpGroup::<NdArray>::new(config, comm, Default::default())
            .err()
            .unwrap();
        assert!(matches!(err, EpError::InvalidConfig(m) if m.contains("transport has 2 ranks")));
    }
}
