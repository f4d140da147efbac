//! The language model's training on one rank: the step (experts by expert
//! parallelism, every other weight by data parallelism), the held-out loss, the
//! checkpoint and the sampled text at the end.

use std::fmt;
use std::path::PathBuf;

use burn::module::{Module, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer, SgdConfig, SimpleOptimizer};
use burn::record::Record;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use burn_ep::{EpConfig, EpError, EpGroup, EpResult, ExpertParallelBackend};
use ep_core::synthetic::SplitMix64;

use crate::checkpoint::{self, CheckpointError, Manifest};
use crate::grads::sum_over_group;
use crate::lm::{LmOutput, LmShape, MoeTransformer};
use crate::text::{rank_share, sequences, Corpus, VOCAB};

/// Everything that fixes a run on text.
#[derive(Debug, Clone)]
pub struct TextRun {
    pub shape: LmShape,
    /// Sequences per optimizer step, over all ranks.
    pub sequences: usize,
    /// Train until this many optimizer steps are taken (a resumed run counts the
    /// checkpoint's).
    pub steps: usize,
    pub learning_rate: f64,
    /// Plain SGD instead of AdamW (where runs must match step by step).
    pub sgd: bool,
    pub seed: u64,
    /// The held-out loss every this many steps, and at the last.
    pub eval_every: usize,
    pub save: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// Bytes to sample after the prompt at the end (0: none).
    pub sample: usize,
    pub prompt: String,
}

impl TextRun {
    pub fn tokens_per_step(&self) -> usize {
        self.sequences * self.shape.sequence
    }

    /// The configuration of the group this run trains on with `ranks` ranks: room
    /// for a step's tokens, one row count for every local expert (the MoE layer then
    /// runs its experts on the dispatched rows in place).
    pub fn ep_config(&self, ranks: usize) -> EpConfig {
        let s = &self.shape;
        EpConfig::new(ranks, s.num_experts, s.top_k, s.hidden)
            .with_max_tokens_per_rank(self.tokens_per_step())
            .with_uniform_expert_rows(true)
    }

    /// What a checkpoint of this run records at `step`.
    pub fn manifest(&self, step: usize, ranks: usize) -> Manifest {
        let optimizer = if self.sgd { "sgd" } else { "adamw" };
        Manifest {
            step,
            ranks,
            model: format!("{} optimizer={optimizer}", self.shape.describe()),
        }
    }
}

/// What one optimizer step reports (the same on every rank).
#[derive(Debug, Clone)]
pub struct TextStep {
    /// Steps taken, this one included.
    pub step: usize,
    /// Mean cross-entropy (nats per byte) over the group's tokens.
    pub loss: f32,
    /// The held-out loss after this step, where measured.
    pub held_out: Option<f32>,
    /// Pairs per expert over the group, per layer.
    pub loads: Vec<Vec<usize>>,
}

/// What a rank's run gives back.
#[derive(Debug)]
pub struct TextOutcome {
    pub steps: Vec<TextStep>,
    /// The prompt and the bytes sampled after it.
    pub sample: Option<String>,
}

/// Why a run stopped.
#[derive(Debug)]
pub enum RunError {
    Ep(EpError),
    Checkpoint(CheckpointError),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ep(e) => e.fmt(f),
            Self::Checkpoint(e) => e.fmt(f),
        }
    }
}

impl From<EpError> for RunError {
    fn from(e: EpError) -> Self {
        Self::Ep(e)
    }
}

impl From<CheckpointError> for RunError {
    fn from(e: CheckpointError) -> Self {
        Self::Checkpoint(e)
    }
}

/// Trains this rank's part of the model; `report` sees every step.
pub fn train_text<B>(
    run: &TextRun,
    corpus: &Corpus,
    group: &EpGroup<B>,
    report: impl FnMut(&TextStep),
) -> Result<TextOutcome, RunError>
where
    B: AutodiffBackend + ExpertParallelBackend,
{
    if run.sgd {
        train_with(run, corpus, group, SgdConfig::new().init(), report)
    } else {
        train_with(run, corpus, group, AdamWConfig::new().init(), report)
    }
}

/// The seed of step `step`'s sequences.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step as u64
}

fn train_with<B, O>(
    run: &TextRun,
    corpus: &Corpus,
    group: &EpGroup<B>,
    mut optimizer: OptimizerAdaptor<O, MoeTransformer<B>, B>,
    mut report: impl FnMut(&TextStep),
) -> Result<TextOutcome, RunError>
where
    B: AutodiffBackend + ExpertParallelBackend,
    O: SimpleOptimizer<B::InnerBackend>,
{
    let (rank, world) = (group.rank(), group.world_size());
    let device = group.device().clone();
    let length = run.shape.sequence;
    let mut model = MoeTransformer::<B>::init(&run.shape, run.seed, rank, world, &device);
    let mut first = 0;
    if let Some(dir) = &run.resume {
        let saved = Manifest::read(dir)?;
        saved.check_resumable_as(&run.manifest(saved.step, world))?;
        let (loaded, state) = checkpoint::load(dir, model, rank, world, &device)?;
        model = loaded;
        optimizer = optimizer.load_record(state);
        first = saved.step;
    }
    let cross_entropy = CrossEntropyLossConfig::new().init(&device);
    // The same held-out sequences at every measurement.
    let held_out = rank_batch::<B>(&corpus.held_out, run, !run.seed, group);
    let mut steps = Vec::new();
    for step in first..run.steps {
        let (inputs, targets) =
            rank_batch::<B>(&corpus.train, run, step_seed(run.seed, step), group);
        let LmOutput { logits, loads } = model.forward(inputs, length, group)?;
        let loss = cross_entropy.forward(logits, targets);
        let value = loss.clone().inner();
        // Each rank's share of the group's mean loss: expert gradients then sum over
        // the ranks by construction, shared ones through the all-reduce.
        let grads = (loss / world as f64).backward();
        let mut grads = GradientsParams::from_grads(grads, &model);
        let rank_only = model.rank_only_params();
        let (loss_sum, loads) =
            sum_over_group(&model, rank_only, &mut grads, value, &loads, group)?;
        model = optimizer.step(run.learning_rate, model, grads);
        model.blocks = model
            .blocks
            .into_iter()
            .zip(&loads)
            .map(|(mut block, load)| {
                block.moe = block.moe.update_bias(load);
                block
            })
            .collect();
        let done = step + 1;
        let held_out = if done % run.eval_every == 0 || done == run.steps {
            Some(held_out_loss(&model, length, &held_out, group)?)
        } else {
            None
        };
        let r = TextStep {
            step: done,
            loss: loss_sum / world as f32,
            held_out,
            loads,
        };
        report(&r);
        steps.push(r);
    }
    if let Some(dir) = &run.save {
        save(
            dir,
            &model,
            optimizer.to_record(),
            run,
            corpus,
            &steps,
            first,
            group,
        )?;
    }
    let sample = if run.sample > 0 {
        Some(sample(&model, run, group)?)
    } else {
        None
    };
    Ok(TextOutcome { steps, sample })
}

/// Saves this rank's part; rank 0 then, once every rank has saved, the manifest
/// and the loss curve (the resumed checkpoint's curve up to `first`, then this
/// run's).
#[allow(clippy::too_many_arguments)]
fn save<B, O, S>(
    dir: &std::path::Path,
    model: &MoeTransformer<B>,
    optimizer: O,
    run: &TextRun,
    corpus: &Corpus,
    steps: &[TextStep],
    first: usize,
    group: &EpGroup<B>,
) -> Result<(), RunError>
where
    B: AutodiffBackend + ExpertParallelBackend,
    O: Record<B> + IntoIterator<Item = (ParamId, S)> + FromIterator<(ParamId, S)>,
{
    let (rank, world) = (group.rank(), group.world_size());
    checkpoint::save(
        dir,
        model,
        optimizer,
        &model.rank_only_params(),
        rank,
        world,
    )?;
    group.barrier()?;
    if rank != 0 {
        return Ok(());
    }
    let mut losses = match &run.resume {
        Some(earlier) => checkpoint::read_losses(earlier)?,
        None => Vec::new(),
    };
    losses.retain(|l| l.0 <= first);
    losses.extend(steps.iter().map(|s| (s.step, s.loss, s.held_out)));
    checkpoint::write_losses(dir, &losses, corpus.unigram_loss())?;
    run.manifest(first + steps.len(), world).write(dir)?;
    Ok(())
}

/// Rank `group.rank()`'s share of `run.sequences` sequences of `text` drawn from
/// `seed`: its input bytes and the bytes that follow each, as token tensors.
fn rank_batch<B: AutodiffBackend + ExpertParallelBackend>(
    text: &[u8],
    run: &TextRun,
    seed: u64,
    group: &EpGroup<B>,
) -> (Tensor<B, 1, Int>, Tensor<B, 1, Int>) {
    let (rank, world) = (group.rank(), group.world_size());
    let (inputs, targets) = sequences(text, run.shape.sequence, run.sequences, seed);
    let tokens = |all: Vec<i64>| {
        let share = rank_share(&all, rank, world);
        let n = share.len();
        Tensor::from_data(TensorData::new(share, [n]), group.device())
    };
    (tokens(inputs), tokens(targets))
}

/// The mean loss over the group on the held-out batch (each rank's share, made once
/// by [`rank_batch`]), without gradients.
fn held_out_loss<B>(
    model: &MoeTransformer<B>,
    length: usize,
    (inputs, targets): &(Tensor<B, 1, Int>, Tensor<B, 1, Int>),
    group: &EpGroup<B>,
) -> EpResult<f32>
where
    B: AutodiffBackend + ExpertParallelBackend,
{
    let model = model.clone().no_grad();
    let logits = model.forward(inputs.clone(), length, group)?.logits;
    let loss = CrossEntropyLossConfig::new()
        .init(group.device())
        .forward(logits, targets.clone())
        .into_scalar()
        .elem::<f32>();
    Ok(group.all_reduce_sum(vec![loss])?[0] / group.world_size() as f32)
}

/// How peaked the sampling is: below 1, likelier bytes are favoured more.
const TEMPERATURE: f32 = 0.8;

/// `run.prompt` and `run.sample` bytes after it, each drawn from the model's
/// distribution over the next byte given the last sequence's worth. Every rank runs
/// the model (its experts serve every rank); rank 0 draws, and the all-reduce
/// tells the others.
fn sample<B>(model: &MoeTransformer<B>, run: &TextRun, group: &EpGroup<B>) -> EpResult<String>
where
    B: AutodiffBackend + ExpertParallelBackend,
{
    let model = model.clone().no_grad();
    let device = group.device();
    let length = run.shape.sequence;
    let mut text: Vec<u8> = run.prompt.bytes().collect();
    if text.is_empty() {
        text.push(b'\n');
    }
    let mut rng = SplitMix64::new(run.seed ^ 0x5a5a);
    for _ in 0..run.sample {
        let context: Vec<i64> = text[text.len().saturating_sub(length)..]
            .iter()
            .map(|&b| b as i64)
            .collect();
        let n = context.len();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(context, [n]), device);
        let logits = model.forward(tokens, n, group)?.logits;
        let drawn = if group.rank() == 0 {
            let last: Vec<f32> = logits
                .narrow(0, n - 1, 1)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            draw(&last, &mut rng) as f32
        } else {
            0.0
        };
        text.push(group.all_reduce_sum(vec![drawn])?[0] as u8);
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// A byte drawn from `softmax(logits / TEMPERATURE)`.
fn draw(logits: &[f32], rng: &mut SplitMix64) -> usize {
    debug_assert_eq!(logits.len(), VOCAB);
    let top = logits.iter().copied().fold(f32::MIN, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from((l - top) / TEMPERATURE).exp())
        .collect();
    let mut left = f64::from(rng.next_f32()) * weights.iter().sum::<f64>();
    for (byte, w) in weights.iter().enumerate() {
        left -= w;
        if left <= 0.0 {
            return byte;
        }
    }
    VOCAB - 1
}
