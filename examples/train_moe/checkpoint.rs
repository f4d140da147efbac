//! `--save` and `--resume`: the model and optimizer through Burn's recorders, each
//! rank writing only what it alone holds.
//!
//! A checkpoint folder holds:
//! - `shared.mpk`: every weight all ranks hold alike (attention, norms, embeddings,
//!   head, routers, shared experts), written once, by rank 0;
//! - `experts-R-of-W.mpk`: rank R's routed experts, one file per rank;
//! - `optimizer-shared.mpk` (rank 0) and `optimizer-R-of-W.mpk` (rank R): the
//!   optimizer's state, split the same way;
//! - `checkpoint.txt`: the step, the rank count and the model's figures, written
//!   last, once every rank has saved (a folder without it holds no checkpoint);
//! - `losses.tsv` and `loss.svg`: the loss curve so far, as numbers and as a picture.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::{Module, ParamId};
use burn::nn::attention::MultiHeadAttention;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use burn_ep::moe::{GroupedExperts, Router};

use crate::lm::{Block, MoeTransformer, SwiGlu};
use crate::plot::loss_svg;

/// Full precision: a resumed run continues bit for bit.
type Files = NamedMpkFileRecorder<FullPrecisionSettings>;

/// What a checkpoint is of.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Optimizer steps taken.
    pub step: usize,
    pub ranks: usize,
    /// `LmShape::describe` and the optimizer's name.
    pub model: String,
}

const MANIFEST: &str = "checkpoint.txt";

impl Manifest {
    pub fn write(&self, dir: &Path) -> Result<(), CheckpointError> {
        let text = format!(
            "step {}\nranks {}\nmodel {}\n",
            self.step, self.ranks, self.model
        );
        std::fs::write(dir.join(MANIFEST), text).map_err(|e| CheckpointError::io(dir, e))
    }

    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| {
                    CheckpointError::Invalid(format!("{} has no `{name}` line", path.display()))
                })
        };
        let number = |name: &str| {
            field(name)?
                .parse::<usize>()
                .map_err(|e| CheckpointError::Invalid(format!("{}: `{name}`: {e}", path.display())))
        };
        Ok(Self {
            step: number("step")?,
            ranks: number("ranks")?,
            model: field("model")?,
        })
    }

    /// Fails naming what differs when this checkpoint cannot continue as `current`
    /// (whose step is ignored).
    pub fn check_resumable_as(&self, current: &Manifest) -> Result<(), CheckpointError> {
        if self.ranks != current.ranks {
            return Err(CheckpointError::Mismatch(format!(
                "the checkpoint was saved by {} ranks, this run has {} (each rank holds its own experts)",
                self.ranks, current.ranks
            )));
        }
        if self.model != current.model {
            return Err(CheckpointError::Mismatch(format!(
                "the checkpoint's model is `{}`, this run's is `{}`",
                self.model, current.model
            )));
        }
        Ok(())
    }
}

/// Why a checkpoint could not be written or read.
#[derive(Debug)]
pub enum CheckpointError {
    Io {
        path: PathBuf,
        reason: String,
    },
    Invalid(String),
    /// The checkpoint is of another run's shape.
    Mismatch(String),
}

impl CheckpointError {
    fn io(path: &Path, e: impl fmt::Display) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, reason } => write!(f, "checkpoint {}: {reason}", path.display()),
            Self::Invalid(what) => write!(f, "checkpoint: {what}"),
            Self::Mismatch(what) => write!(f, "cannot resume: {what}"),
        }
    }
}

impl std::error::Error for CheckpointError {}

/// A block's weights that every rank holds.
#[derive(Record)]
pub struct SharedBlockRecord<B: Backend> {
    attention_norm: <RmsNorm<B> as Module<B>>::Record,
    attention: <MultiHeadAttention<B> as Module<B>>::Record,
    ffn_norm: <RmsNorm<B> as Module<B>>::Record,
    router: <Router<B> as Module<B>>::Record,
    shared_expert: Option<<SwiGlu<B> as Module<B>>::Record>,
}

/// The model's weights that every rank holds: all but the routed experts.
#[derive(Record)]
pub struct SharedRecord<B: Backend> {
    tokens: <Embedding<B> as Module<B>>::Record,
    positions: <Embedding<B> as Module<B>>::Record,
    blocks: Vec<SharedBlockRecord<B>>,
    norm: <RmsNorm<B> as Module<B>>::Record,
    head: <Linear<B> as Module<B>>::Record,
}

type ExpertsRecord<B> = Vec<<GroupedExperts<B> as Module<B>>::Record>;

fn shared_record<B: Backend>(model: &MoeTransformer<B>) -> SharedRecord<B> {
    SharedRecord {
        tokens: model.tokens.clone().into_record(),
        positions: model.positions.clone().into_record(),
        blocks: model
            .blocks
            .iter()
            .map(|b| SharedBlockRecord {
                attention_norm: b.attention_norm.clone().into_record(),
                attention: b.attention.clone().into_record(),
                ffn_norm: b.ffn_norm.clone().into_record(),
                router: b.moe.router.clone().into_record(),
                shared_expert: b.shared_expert.clone().map(Module::into_record),
            })
            .collect(),
        norm: model.norm.clone().into_record(),
        head: model.head.clone().into_record(),
    }
}

fn experts_record<B: Backend>(model: &MoeTransformer<B>) -> ExpertsRecord<B> {
    model
        .blocks
        .iter()
        .map(|b| b.moe.experts.clone().into_record())
        .collect()
}

/// `model` with the saved weights: the shared ones, then this rank's experts.
fn load_weights<B: Backend>(
    model: MoeTransformer<B>,
    shared: SharedRecord<B>,
    experts: ExpertsRecord<B>,
) -> Result<MoeTransformer<B>, CheckpointError> {
    if shared.blocks.len() != model.blocks.len() || experts.len() != model.blocks.len() {
        return Err(CheckpointError::Invalid(format!(
            "{} shared blocks and {} expert blocks saved, the model has {} blocks",
            shared.blocks.len(),
            experts.len(),
            model.blocks.len()
        )));
    }
    let blocks = model
        .blocks
        .into_iter()
        .zip(shared.blocks)
        .zip(experts)
        .map(|((block, saved), experts)| {
            let Block {
                attention_norm,
                attention,
                ffn_norm,
                mut moe,
                shared_expert,
            } = block;
            moe.router = moe.router.load_record(saved.router);
            moe.experts = moe.experts.load_record(experts);
            Block {
                attention_norm: attention_norm.load_record(saved.attention_norm),
                attention: attention.load_record(saved.attention),
                ffn_norm: ffn_norm.load_record(saved.ffn_norm),
                moe,
                shared_expert: match (shared_expert, saved.shared_expert) {
                    (Some(e), Some(r)) => Some(e.load_record(r)),
                    (e, _) => e,
                },
            }
        })
        .collect();
    Ok(MoeTransformer {
        tokens: model.tokens.load_record(shared.tokens),
        positions: model.positions.load_record(shared.positions),
        blocks,
        norm: model.norm.load_record(shared.norm),
        head: model.head.load_record(shared.head),
    })
}

fn rank_file(dir: &Path, what: &str, rank: usize, ranks: usize) -> PathBuf {
    dir.join(format!("{what}-{rank}-of-{ranks}"))
}

/// Writes `item` to `path` plus the recorder's extension.
fn write<B: Backend, R: Record<B>>(item: R, path: PathBuf) -> Result<(), CheckpointError> {
    Recorder::<B>::record(&Files::new(), item, path.clone())
        .map(|_| ())
        .map_err(|e| CheckpointError::io(&path.with_extension("mpk"), e))
}

/// Reads what [`write`] wrote to `path`.
fn read<B: Backend, R: Record<B>>(path: PathBuf, device: &B::Device) -> Result<R, CheckpointError> {
    Recorder::<B>::load(&Files::new(), path.clone(), device)
        .map_err(|e| CheckpointError::io(&path.with_extension("mpk"), e))
}

/// Writes this rank's part of a checkpoint: rank 0 the shared weights and their
/// optimizer state, every rank its experts and theirs. The optimizer's record is a
/// map from parameter to state, split by `rank_only` (this rank's parameters).
pub fn save<B, O, S>(
    dir: &Path,
    model: &MoeTransformer<B>,
    optimizer: O,
    rank_only: &[ParamId],
    rank: usize,
    ranks: usize,
) -> Result<(), CheckpointError>
where
    B: Backend,
    O: Record<B> + IntoIterator<Item = (ParamId, S)> + FromIterator<(ParamId, S)>,
{
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
    let (own, shared): (Vec<_>, Vec<_>) = optimizer
        .into_iter()
        .partition(|(id, _)| rank_only.contains(id));
    let (own, shared): (O, O) = (own.into_iter().collect(), shared.into_iter().collect());
    if rank == 0 {
        write(shared_record(model), dir.join("shared"))?;
        write::<B, O>(shared, dir.join("optimizer-shared"))?;
    }
    write(
        experts_record(model),
        rank_file(dir, "experts", rank, ranks),
    )?;
    write::<B, O>(own, rank_file(dir, "optimizer", rank, ranks))
}

/// This rank's model and optimizer state from `dir` (see [`save`]).
pub fn load<B, O, S>(
    dir: &Path,
    model: MoeTransformer<B>,
    rank: usize,
    ranks: usize,
    device: &B::Device,
) -> Result<(MoeTransformer<B>, O), CheckpointError>
where
    B: Backend,
    O: Record<B> + IntoIterator<Item = (ParamId, S)> + Extend<(ParamId, S)>,
{
    let shared: SharedRecord<B> = read(dir.join("shared"), device)?;
    let experts: ExpertsRecord<B> = read(rank_file(dir, "experts", rank, ranks), device)?;
    let mut optimizer: O = read(dir.join("optimizer-shared"), device)?;
    let own: O = read(rank_file(dir, "optimizer", rank, ranks), device)?;
    optimizer.extend(own);
    Ok((load_weights(model, shared, experts)?, optimizer))
}

/// The loss curve: `(step, training loss, held-out loss if measured)` a line each in
/// `losses.tsv`, and as a picture with the `baseline` loss in `loss.svg`.
pub fn write_losses(
    dir: &Path,
    losses: &[(usize, f32, Option<f32>)],
    baseline: f64,
) -> Result<(), CheckpointError> {
    let mut text = String::from("step\ttrain\theld_out\n");
    for (step, train, held_out) in losses {
        let held_out = held_out.map_or_else(String::new, |l| l.to_string());
        text.push_str(&format!("{step}\t{train}\t{held_out}\n"));
    }
    let path = dir.join("losses.tsv");
    std::fs::write(&path, text).map_err(|e| CheckpointError::io(&path, e))?;
    let picture = dir.join("loss.svg");
    std::fs::write(&picture, loss_svg(losses, baseline))
        .map_err(|e| CheckpointError::io(&picture, e))
}

/// What [`write_losses`] wrote; none where the folder has no curve.
pub fn read_losses(dir: &Path) -> Result<Vec<(usize, f32, Option<f32>)>, CheckpointError> {
    let path = dir.join("losses.tsv");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let bad =
        |line: &str| CheckpointError::Invalid(format!("{}: bad line `{line}`", path.display()));
    text.lines()
        .skip(1)
        .map(|line| {
            let mut fields = line.split('\t');
            let step = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad(line))?;
            let train = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad(line))?;
            let held_out = match fields.next() {
                None | Some("") => None,
                Some(f) => Some(f.parse().map_err(|_| bad(line))?),
            };
            Ok((step, train, held_out))
        })
        .collect()
}
