//! `train_moe --task mapping`, and the fixture of `tests/moe.rs`: a small model
//! (embedding → blocks with an MoE layer → head) learning a synthetic token
//! mapping, with expert parallelism over the ranks of an `EpGroup` and data
//! parallelism for everything else.

use burn::module::{Module, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_ep::moe::{MoeConfig, MoeLayer};
use burn_ep::{EpGroup, EpResult, ExpertParallelBackend};
use ep_core::synthetic::SplitMix64;

use crate::grads::sum_over_group;

/// Everything that fixes a run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub ffn_hidden: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub layers: usize,
    /// Tokens per optimizer step over the whole group, split evenly over the ranks.
    pub global_tokens: usize,
    pub learning_rate: f64,
    /// Plain SGD instead of AdamW (used where runs must match step by step).
    pub sgd: bool,
    pub sp_size: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            vocab: 64,
            hidden: 32,
            ffn_hidden: 64,
            num_experts: 8,
            top_k: 2,
            layers: 2,
            global_tokens: 256,
            learning_rate: 1e-2,
            sgd: false,
            sp_size: 1,
            seed: 7,
        }
    }
}

impl TrainConfig {
    /// A model whose MoE layers are GPU-sized: a DeepSeek-V2-Lite-like expert
    /// shape at half its hidden size.
    pub fn gpu() -> Self {
        Self {
            vocab: 1024,
            hidden: 1024,
            ffn_hidden: 1408,
            num_experts: 64,
            top_k: 6,
            layers: 2,
            global_tokens: 8192,
            ..Self::default()
        }
    }

    /// The flops of one optimizer step over the whole group: per token, the
    /// router's, the top-k SwiGLU experts' and the head's products, forward and
    /// backward (twice the forward).
    pub fn step_flops(&self) -> usize {
        let (h, f) = (self.hidden, self.ffn_hidden);
        let per_layer = 2 * h * self.num_experts + self.top_k * 3 * 2 * h * f;
        let forward = self.global_tokens * (self.layers * per_layer + 2 * h * self.vocab);
        3 * forward
    }

    pub fn moe(&self) -> MoeConfig {
        MoeConfig::new(self.hidden, self.ffn_hidden, self.num_experts, self.top_k)
    }
}

/// The synthetic task: every token must be mapped to `(5 * token + 3) mod vocab`
/// through the network. Returns this rank's slice of the step's global batch.
pub fn batch(config: &TrainConfig, step: usize, rank: usize, world: usize) -> (Vec<i64>, Vec<i64>) {
    let mut rng = SplitMix64::new(config.seed.wrapping_mul(31) ^ step as u64);
    let all: Vec<i64> = (0..config.global_tokens)
        .map(|_| rng.below(config.vocab) as i64)
        .collect();
    let per_rank = config.global_tokens / world;
    let tokens = all[rank * per_rank..(rank + 1) * per_rank].to_vec();
    let targets = tokens
        .iter()
        .map(|&t| (5 * t + 3) % config.vocab as i64)
        .collect();
    (tokens, targets)
}

#[derive(Module, Debug)]
pub struct MoeLm<B: Backend> {
    /// `[vocab, H]`
    pub embed: Param<Tensor<B, 2>>,
    pub blocks: Vec<MoeLayer<B>>,
    /// `[H, vocab]`
    pub head: Param<Tensor<B, 2>>,
}

/// What the model's forward pass returns.
pub struct LmOutput<B: Backend> {
    /// `[N, vocab]`
    pub logits: Tensor<B, 2>,
    pub aux_loss: Option<Tensor<B, 1>>,
    /// Per layer, the (token, expert) pairs this rank sent to each expert.
    pub loads: Vec<Vec<usize>>,
}

fn host_param<B: Backend>(seed: u64, shape: [usize; 2], device: &B::Device) -> Param<Tensor<B, 2>> {
    let mut rng = SplitMix64::new(seed);
    let scale = 1.0 / (shape[0] as f32).sqrt();
    let values: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

fn rms_norm<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let scale = (x.clone().powf_scalar(2.0).mean_dim(1) + 1e-6).sqrt();
    x / scale
}

impl<B: ExpertParallelBackend> MoeLm<B> {
    pub fn init(config: &TrainConfig, rank: usize, world: usize, device: &B::Device) -> Self {
        Self {
            embed: host_param(config.seed + 1, [config.vocab, config.hidden], device),
            blocks: (0..config.layers)
                .map(|l| {
                    config
                        .moe()
                        .init(rank, world, config.seed + 100 + l as u64, device)
                })
                .collect(),
            head: host_param(config.seed + 2, [config.hidden, config.vocab], device),
        }
    }

    /// Logits `[N, vocab]`, the auxiliary loss if any, and each layer's loads.
    pub fn forward(&self, tokens: Tensor<B, 1, Int>, group: &EpGroup<B>) -> EpResult<LmOutput<B>> {
        let mut x = self.embed.val().select(0, tokens);
        let mut aux: Option<Tensor<B, 1>> = None;
        let mut loads = Vec::new();
        for block in &self.blocks {
            let out = block.forward(rms_norm(x.clone()), group)?;
            x = x + out.out;
            aux = match (aux, out.aux_loss) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            loads.push(out.tokens_per_expert);
        }
        Ok(LmOutput {
            logits: rms_norm(x).matmul(self.head.val()),
            aux_loss: aux,
            loads,
        })
    }

    /// The parameters each rank holds for itself: its experts, and the routers'
    /// balancing biases (moved from the loads, not by gradients).
    pub fn rank_only_params(&self) -> Vec<ParamId> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let mut ids = b.expert_param_ids();
                ids.push(b.router.bias.id);
                ids
            })
            .collect()
    }
}

/// Mean cross-entropy of `logits [N, V]` against `targets [N]`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let picked = log_softmax(logits, 1).gather(1, targets.unsqueeze_dim(1));
    picked.mean().neg()
}

/// What one optimizer step reports (the same on every rank).
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: usize,
    /// Mean cross-entropy over the whole group's tokens.
    pub loss: f32,
    /// Pairs per expert over the whole group, per layer.
    pub loads: Vec<Vec<usize>>,
}

/// Trains on this rank for `steps` optimizer steps; `report` sees every step.
pub fn train<B>(
    config: &TrainConfig,
    group: &EpGroup<B>,
    steps: usize,
    mut report: impl FnMut(&StepReport),
) -> EpResult<Vec<StepReport>>
where
    B: AutodiffBackend + ExpertParallelBackend,
{
    let (rank, world) = (group.rank(), group.world_size());
    let device = group.device().clone();
    let mut model = MoeLm::<B>::init(config, rank, world, &device);
    let mut adamw = AdamWConfig::new().init::<B, MoeLm<B>>();
    let mut sgd = SgdConfig::new().init::<B, MoeLm<B>>();
    let mut history = Vec::new();
    for step in 0..steps {
        let (tokens, targets) = batch(config, step, rank, world);
        let n = tokens.len();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [n]), &device);
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
        let LmOutput {
            logits,
            aux_loss: aux,
            loads,
        } = model.forward(tokens, group)?;
        let ce = cross_entropy(logits, targets);
        let ce_value = ce.clone().inner();
        let loss = match aux {
            Some(aux) => ce + aux,
            None => ce,
        };
        // Each rank's share of the group's mean loss: expert gradients then sum
        // over the ranks by construction, shared ones through the all-reduce.
        let grads = (loss / world as f64).backward();
        let mut grads = GradientsParams::from_grads(grads, &model);
        let skip = model.rank_only_params();
        let (loss_sum, global_loads) =
            sum_over_group(&model, skip, &mut grads, ce_value, &loads, group)?;
        let global_loss = loss_sum / world as f32;
        model = if config.sgd {
            sgd.step(config.learning_rate, model, grads)
        } else {
            adamw.step(config.learning_rate, model, grads)
        };
        let blocks = model
            .blocks
            .into_iter()
            .zip(&global_loads)
            .map(|(block, load)| block.update_bias(load))
            .collect();
        model.blocks = blocks;
        let r = StepReport {
            step,
            loss: global_loss,
            loads: global_loads,
        };
        report(&r);
        history.push(r);
    }
    Ok(history)
}
