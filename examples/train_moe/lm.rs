//! The language model `train_moe` trains: a decoder-only transformer whose
//! feed-forward layers are burn-ep's MoE layers, with an optional shared expert
//! beside the routed ones (DeepSeek-MoE).
//!
//! Attention, norms, embeddings and the head are Burn's modules; their weights are
//! drawn from a seeded host stream, so every rank starts with the same shared
//! weights and a model split over W ranks starts as the same model on one rank.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::attention::MultiHeadAttentionConfig;
use burn::nn::attention::{generate_autoregressive_mask, MhaInput, MultiHeadAttention};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_ep::moe::{MoeConfig, MoeLayer};
use burn_ep::{EpGroup, EpResult, ExpertParallelBackend};
use ep_core::synthetic::SplitMix64;

use crate::text::VOCAB;

/// The model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LmShape {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    /// Tokens a sequence holds (and the positions the model knows).
    pub sequence: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Inner width of every expert, routed or shared.
    pub ffn_hidden: usize,
    /// A dense SwiGLU expert every token goes through beside its routed ones.
    pub shared_expert: bool,
}

impl LmShape {
    pub fn moe(&self) -> MoeConfig {
        MoeConfig::new(self.hidden, self.ffn_hidden, self.num_experts, self.top_k)
    }

    /// The figures as one line, `name=value` apart: what a checkpoint records and a
    /// resume compares.
    pub fn describe(&self) -> String {
        format!(
            "hidden={} heads={} layers={} sequence={} experts={} top_k={} ffn={} shared_expert={}",
            self.hidden,
            self.heads,
            self.layers,
            self.sequence,
            self.num_experts,
            self.top_k,
            self.ffn_hidden,
            self.shared_expert
        )
    }

    /// Products of one token's forward pass, in flops: attention's projections and
    /// scores (half the positions on average, causal), the router, the top-k and
    /// shared experts, the head.
    pub fn token_flops(&self) -> usize {
        let (h, f, s) = (self.hidden, self.ffn_hidden, self.sequence);
        let attention = 2 * 4 * h * h + 2 * 2 * h * s / 2;
        let experts = (self.top_k + usize::from(self.shared_expert)) * 3 * 2 * h * f;
        let router = 2 * h * self.num_experts;
        self.layers * (attention + router + experts) + 2 * h * VOCAB
    }
}

/// A dense SwiGLU feed-forward: `down(silu(gate x) * up x)`.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

impl<B: Backend> SwiGlu<B> {
    fn new(hidden: usize, inner: usize, device: &B::Device) -> Self {
        let linear = |i, o| zero_linear(i, o, device);
        Self {
            gate: linear(hidden, inner),
            up: linear(hidden, inner),
            down: linear(inner, hidden),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down
            .forward(silu(self.gate.forward(x.clone())) * self.up.forward(x))
    }
}

/// One transformer block: causal self-attention, then the MoE feed-forward (and
/// the shared expert), each on the normed stream and added back to it.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attention_norm: RmsNorm<B>,
    pub attention: MultiHeadAttention<B>,
    pub ffn_norm: RmsNorm<B>,
    pub moe: MoeLayer<B>,
    pub shared_expert: Option<SwiGlu<B>>,
}

/// The transformer.
#[derive(Module, Debug)]
pub struct MoeTransformer<B: Backend> {
    pub tokens: Embedding<B>,
    /// Learned positions, one per place in a sequence.
    pub positions: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    pub head: Linear<B>,
}

/// What a forward pass returns.
pub struct LmOutput<B: Backend> {
    /// `[sequences * sequence, VOCAB]`
    pub logits: Tensor<B, 2>,
    /// Per layer, the (token, expert) pairs this rank sent to each expert.
    pub loads: Vec<Vec<usize>>,
}

/// A `Linear` without bias whose weight the host initialisation fills in.
fn zero_linear<B: Backend>(input: usize, output: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(input, output)
        .with_bias(false)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// Fills every matrix from a seeded host stream, uniform in `±1/sqrt(rows)`, and
/// leaves vectors (norm gains, biases) as their zero or one initialisers made them.
struct HostInit {
    rng: SplitMix64,
}

impl<B: Backend> ModuleMapper<B> for HostInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        if D != 2 {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let scale = 1.0 / (dims[0] as f32).sqrt();
        let values: Vec<f32> = (0..dims[0] * dims[1])
            .map(|_| (self.rng.next_f32() * 2.0 - 1.0) * scale)
            .collect();
        let filled = Tensor::from_data(TensorData::new(values, dims), &tensor.device())
            // A new tensor is untracked: it must be trained as the one it replaces.
            .set_require_grad(tensor.is_require_grad());
        Param::from_mapped_value(id, filled, mapper)
    }
}

/// `module` with its matrices drawn from `seed`.
fn host_init<B: Backend, M: Module<B>>(module: M, seed: u64) -> M {
    module.map(&mut HostInit {
        rng: SplitMix64::new(seed),
    })
}

impl<B: ExpertParallelBackend> MoeTransformer<B> {
    /// This rank's model: the shared weights as on every rank, the experts of
    /// `rank` out of `world`.
    pub fn init(shape: &LmShape, seed: u64, rank: usize, world: usize, device: &B::Device) -> Self {
        let embedding = |n| {
            EmbeddingConfig::new(n, shape.hidden)
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        let norm = || RmsNormConfig::new(shape.hidden).init(device);
        let blocks = (0..shape.layers)
            .map(|l| {
                let layer_seed = seed + 1000 * (l as u64 + 1);
                // No dropout: it would draw from the backend's generator, which the
                // ranks share as threads, and a run would no longer repeat.
                let attention = MultiHeadAttentionConfig::new(shape.hidden, shape.heads)
                    .with_dropout(0.0)
                    .with_initializer(Initializer::Zeros)
                    .init(device);
                let shared_expert = shape
                    .shared_expert
                    .then(|| SwiGlu::new(shape.hidden, shape.ffn_hidden, device));
                Block {
                    attention_norm: norm(),
                    attention: host_init(attention, layer_seed + 1),
                    ffn_norm: norm(),
                    moe: shape.moe().init(rank, world, layer_seed + 2, device),
                    shared_expert: shared_expert.map(|e| host_init(e, layer_seed + 3)),
                }
            })
            .collect();
        Self {
            tokens: host_init(embedding(VOCAB), seed + 1),
            positions: host_init(embedding(shape.sequence), seed + 2),
            blocks,
            norm: norm(),
            head: host_init(zero_linear(shape.hidden, VOCAB, device), seed + 3),
        }
    }

    /// Logits for every position of `tokens` `[sequences * length]`, sequence after
    /// sequence, `length` at most the model's sequence. Every rank must call it
    /// with the same `length` (the MoE layers exchange rows).
    pub fn forward(
        &self,
        tokens: Tensor<B, 1, Int>,
        length: usize,
        group: &EpGroup<B>,
    ) -> EpResult<LmOutput<B>> {
        let [n] = tokens.dims();
        let sequences = n / length;
        let device = tokens.device();
        let tokens = tokens.reshape([sequences, length]);
        let places = Tensor::<B, 1, Int>::arange(0..length as i64, &device).reshape([1, length]);
        let mut x = self.tokens.forward(tokens) + self.positions.forward(places);
        let mask = generate_autoregressive_mask::<B>(sequences, length, &device);
        let hidden = x.dims()[2];
        let mut loads = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let attended = block.attention.forward(
                MhaInput::self_attn(block.attention_norm.forward(x.clone()))
                    .mask_attn(mask.clone()),
            );
            x = x + attended.context;
            let normed = block.ffn_norm.forward(x.clone()).reshape([n, hidden]);
            let routed = block.moe.forward(normed.clone(), group)?;
            let mut ffn = routed.out;
            if let Some(shared) = &block.shared_expert {
                ffn = ffn + shared.forward(normed);
            }
            x = x + ffn.reshape([sequences, length, hidden]);
            loads.push(routed.tokens_per_expert);
        }
        let logits = self.head.forward(self.norm.forward(x)).reshape([n, VOCAB]);
        Ok(LmOutput { logits, loads })
    }

    /// The parameters each rank holds for itself: its routed experts, and the
    /// routers' balancing biases (moved from the group's loads, not by gradients).
    pub fn rank_only_params(&self) -> Vec<ParamId> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let mut ids = b.moe.expert_param_ids();
                ids.push(b.moe.router.bias.id);
                ids
            })
            .collect()
    }
}
