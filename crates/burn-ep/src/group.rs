//! `EpGroup`: dispatch, cached dispatch and combine for one rank of a group.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use ep_core::layout::{ExpertLayout, SendLayout};
use ep_core::padding::sp_padded_tokens;
use ep_core::{validate, EpConfig, EpError, EpResult};
use ep_mesh::LocalComm;

use crate::routing::Routing;

/// What a recording dispatch returns.
#[derive(Debug, Clone)]
pub struct Dispatched<B: Backend> {
    /// `[padded rows, hidden]`: rows grouped by local expert, each group padded to
    /// the expert alignment with zero rows.
    pub rows: Tensor<B, 2>,
    /// Rows per local expert, before padding.
    pub expert_counts: Vec<usize>,
    /// The handle that cached dispatch and combine replay.
    pub routing: Routing<B>,
}

/// One rank's member of an expert-parallel group.
pub struct EpGroup<B: Backend> {
    config: EpConfig,
    comm: LocalComm,
    device: B::Device,
}

/// What one rank sends another in a recording dispatch.
struct RouteMessage {
    /// `[tokens, top_k]` local expert ids at the destination, `-1` elsewhere.
    local_experts: Vec<i32>,
    rows: Option<TensorData>,
    weights: Option<TensorData>,
}

impl<B: Backend> EpGroup<B> {
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
    /// `[T, K]`. Errors on bad ids, shapes, devices or too many tokens, on every rank
    /// before any data moves on that rank.
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

        let padded_tokens = sp_padded_tokens(tokens, c.sp_size);
        let mut ids: Vec<i64> = topk_idx
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| EpError::DTypeMismatch {
                what: "topk_idx".into(),
                expected: "an integer type".into(),
                got: format!("{e:?}"),
            })?;
        // Check before padding so errors name the caller's token index.
        validate::check_topk_idx(c, &ids)?;
        ids.resize(padded_tokens * c.top_k, -1);
        let x = pad_rows(x, padded_tokens);
        let topk_weights = pad_rows(topk_weights, padded_tokens);

        let send = SendLayout::new(c, &ids);
        let send_index: Vec<Option<Tensor<B, 1, Int>>> = send
            .tokens_per_rank
            .iter()
            .map(|t| (!t.is_empty()).then(|| self.index_tensor(t.iter().map(|&v| v as i64))))
            .collect();
        let messages: Vec<RouteMessage> = send_index
            .iter()
            .zip(&send.local_experts)
            .map(|(index, local_experts)| RouteMessage {
                local_experts: local_experts.clone(),
                rows: index
                    .as_ref()
                    .map(|i| x.clone().select(0, i.clone()).into_data()),
                weights: index
                    .as_ref()
                    .map(|i| topk_weights.clone().select(0, i.clone()).into_data()),
            })
            .collect();
        let received = self.exchange(messages)?;

        let recv_counts: Vec<usize> = received
            .iter()
            .map(|m| m.local_experts.len() / c.top_k)
            .collect();
        let recv_local: Vec<i32> = received
            .iter()
            .flat_map(|m| m.local_experts.iter().copied())
            .collect();
        let (rows, weights): (Vec<_>, Vec<_>) = received
            .into_iter()
            .filter_map(|m| Some((self.upload(m.rows?), self.upload(m.weights?))))
            .unzip();
        let experts = ExpertLayout::new(c, &recv_local);
        let received_rows: usize = recv_counts.iter().sum();

        // Expand: each expert-major row reads its received row; pads read a zero row.
        let expand_index = self.index_tensor(experts.row_origin.iter().map(|o| match o {
            Some((row, _)) => *row as i64,
            None => received_rows as i64,
        }));
        let weight_index = self.index_tensor(experts.row_origin.iter().map(|o| match o {
            Some((row, slot)) => (row * c.top_k + slot) as i64,
            None => (received_rows * c.top_k) as i64,
        }));
        let dtype = x.dtype();
        let received_x = with_zero_row(rows, c.hidden_size, &self.device, dtype);
        let received_w = with_zero_row(weights, c.top_k, &self.device, topk_weights.dtype());
        let padded_rows = experts.padded_rows();
        // CubeCL backends cannot run ops on zero-size tensors: a rank that receives
        // nothing gets empty outputs made directly.
        let (expert_rows, weights) = if padded_rows == 0 {
            (
                Tensor::zeros([0, c.hidden_size], (&self.device, dtype)),
                Tensor::zeros([0], (&self.device, topk_weights.dtype())),
            )
        } else {
            let weights = received_w.reshape([(received_rows + 1) * c.top_k]);
            (
                received_x.select(0, expand_index.clone()),
                weights.select(0, weight_index),
            )
        };

        let reduce_index = (0..experts.max_contributions())
            .map(|q| {
                self.index_tensor(
                    experts
                        .contributions
                        .iter()
                        .map(|rows| rows.get(q).copied().unwrap_or(experts.padded_rows()) as i64),
                )
            })
            .collect();
        let sum_index = send
            .tokens_per_rank
            .iter()
            .map(|sent| {
                (!sent.is_empty()).then(|| {
                    let mut position = vec![sent.len() as i64; padded_tokens];
                    for (i, &token) in sent.iter().enumerate() {
                        position[token] = i as i64;
                    }
                    self.index_tensor(position)
                })
            })
            .collect();

        let routing = Routing {
            tokens,
            padded_tokens,
            hidden: c.hidden_size,
            world_size: c.world_size,
            dtype,
            device: self.device.clone(),
            send,
            recv_counts,
            experts,
            send_index,
            expand_index,
            reduce_index,
            sum_index,
            weights,
        };
        Ok(Dispatched {
            rows: expert_rows,
            expert_counts: routing.experts.expert_counts.clone(),
            routing,
        })
    }

    /// Replays `routing` with a new payload `x` (`[T, H]`, the T of the handle): the
    /// same rows go to the same places, with no layout or count exchange.
    pub fn dispatch_cached(&self, x: Tensor<B, 2>, routing: &Routing<B>) -> EpResult<Tensor<B, 2>> {
        self.check_handle(routing)?;
        routing.check_payload("x", routing.tokens, x.dims(), x.dtype(), &x.device())?;
        let x = pad_rows(x, routing.padded_tokens);
        let segments = routing
            .send_index
            .iter()
            .map(|index| {
                index
                    .as_ref()
                    .map(|i| x.clone().select(0, i.clone()).into_data())
            })
            .collect();
        let rows = self.receive_rows(self.exchange(segments)?);
        if routing.padded_rows() == 0 {
            return Ok(Tensor::zeros(
                [0, routing.hidden],
                (&self.device, routing.dtype),
            ));
        }
        let received = with_zero_row(rows, routing.hidden, &self.device, routing.dtype);
        Ok(received.select(0, routing.expand_index.clone()))
    }

    /// Sends the expert outputs `y` (`[padded rows, H]`, the expert-major layout of
    /// `routing`) back to their tokens: each rank first sums its local experts'
    /// outputs weighted by the top-k weights, then each token sums what comes back
    /// from each rank, in rank order. Returns `[T, H]`.
    pub fn combine(&self, y: Tensor<B, 2>, routing: &Routing<B>) -> EpResult<Tensor<B, 2>> {
        self.check_handle(routing)?;
        routing.check_payload("y", routing.padded_rows(), y.dims(), y.dtype(), &y.device())?;
        let hidden = routing.hidden;
        let dtype = y.dtype();

        // Reduce: weighted sum over each received row's local experts.
        // (No received rows means no contributions and no zero-size ops.)
        let partial = (!routing.reduce_index.is_empty()).then(|| {
            let weights = routing
                .weights
                .clone()
                .cast(dtype)
                .reshape([routing.padded_rows(), 1]);
            let weighted = with_zero_row(vec![y * weights], hidden, &self.device, dtype);
            let mut contributions = routing
                .reduce_index
                .iter()
                .map(|index| weighted.clone().select(0, index.clone()));
            let first = contributions.next().expect("checked non-empty");
            contributions.fold(first, |acc, next| acc + next)
        });

        // Back to the source ranks: received rows are grouped by source rank.
        let mut start = 0;
        let segments = routing
            .recv_counts
            .iter()
            .map(|&count| {
                let segment = (count > 0).then(|| {
                    let rows = partial.clone().expect("rows were received");
                    rows.narrow(0, start, count).into_data()
                });
                start += count;
                segment
            })
            .collect();
        let back = self.exchange(segments)?;

        // Sum over ranks in rank order; tokens a rank did not get read a zero row.
        let out = back
            .into_iter()
            .zip(&routing.sum_index)
            .filter_map(|(segment, index)| {
                let segment = self.upload(segment?);
                let rows = with_zero_row(vec![segment], hidden, &self.device, dtype);
                Some(rows.select(0, index.clone()?))
            })
            .reduce(|acc, next| acc + next)
            .unwrap_or_else(|| {
                Tensor::zeros([routing.padded_tokens, hidden], (&self.device, dtype))
            });
        Ok(match routing.tokens {
            0 => Tensor::zeros([0, hidden], (&self.device, dtype)),
            t if t == routing.padded_tokens => out,
            t => out.narrow(0, 0, t),
        })
    }

    /// The all-to-all between the ranks' threads. Segments travel as host data: each
    /// thread drives its own device stream, and a device buffer shared between
    /// streams can be read before it is written or reused while a peer still reads
    /// it (seen on wgpu). Device-to-device transports come with the CUDA transports.
    fn exchange<T: Send + 'static>(&self, items: Vec<T>) -> EpResult<Vec<T>> {
        self.comm.all_to_all(items)
    }

    fn upload<const D: usize>(&self, data: TensorData) -> Tensor<B, D> {
        let dtype = data.dtype;
        Tensor::from_data(data, (&self.device, dtype))
    }

    fn receive_rows(&self, segments: Vec<Option<TensorData>>) -> Vec<Tensor<B, 2>> {
        segments
            .into_iter()
            .flatten()
            .map(|s| self.upload(s))
            .collect()
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

    fn index_tensor(&self, values: impl IntoIterator<Item = i64>) -> Tensor<B, 1, Int> {
        let values: Vec<i64> = values.into_iter().collect();
        let n = values.len();
        Tensor::from_data(TensorData::new(values, [n]), &self.device)
    }
}

/// Pads `[T, C]` with zero rows up to `rows`.
fn pad_rows<B: Backend>(t: Tensor<B, 2>, rows: usize) -> Tensor<B, 2> {
    let [n, cols] = t.dims();
    if n == rows {
        return t;
    }
    let zeros = Tensor::zeros([rows - n, cols], (&t.device(), t.dtype()));
    Tensor::cat(vec![t, zeros], 0)
}

/// Concatenates row blocks and appends one zero row, the target of every "nothing
/// here" index.
fn with_zero_row<B: Backend>(
    mut blocks: Vec<Tensor<B, 2>>,
    cols: usize,
    device: &B::Device,
    dtype: burn::tensor::DType,
) -> Tensor<B, 2> {
    blocks.push(Tensor::zeros([1, cols], (device, dtype)));
    Tensor::cat(blocks, 0)
}
