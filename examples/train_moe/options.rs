//! `train_moe`'s command line: the options, the task and size they pick, and the
//! checks that turn them into a [`Job`] or a message naming what is wrong.

use std::path::PathBuf;

use burn_ep::Transport;
use clap::{Parser, ValueEnum};

use crate::checkpoint::Manifest;
use crate::cli::{at_least_one, BackendName};
use crate::lm::LmShape;
use crate::lm_training::TextRun;
use crate::mapping::TrainConfig;
use crate::text::{self, Corpus};

/// train_moe: train a transformer language model with MoE layers, its experts
/// spread over ranks.
#[derive(Debug, Parser)]
#[command(name = "train_moe", after_help = AFTER_HELP)]
pub struct Options {
    /// What to learn: text (a byte-level language model), or mapping (the
    /// synthetic token-mapping task of the tests)
    #[arg(long, value_enum, default_value_t = Task::Text)]
    pub task: Task,
    /// The text to learn: a file, or a folder whose files are read in the order of
    /// their names; by default the repository's book and README
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Simulated ranks (threads sharing the device)
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub ranks: usize,
    /// CubeCL's backends as they are, or under Burn's fusion (`*-fusion`, as Burn's
    /// default features give them); cuda needs the `cuda` feature
    #[arg(long, value_enum, default_value_t = BackendName::Ndarray)]
    pub backend: BackendName,
    /// Optimizer steps to train up to, a resumed run's included [default: 250 on
    /// text, 300 on mapping]
    #[arg(long, value_parser = at_least_one)]
    pub steps: Option<usize>,
    /// Sequence-parallel size (pads the tokens per rank)
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub sp: usize,
    /// local | cuda-peer (rows by device copies; --backend cuda) | nccl |
    /// hierarchical (one GPU per rank; --backend cuda); by default cuda-peer on
    /// cuda, local elsewhere
    #[arg(long)]
    pub transport: Option<Transport>,
    /// The model and batch: small, or one whose MoE layers are GPU-sized (hidden
    /// 1024, 64 experts of width 1408, top-6, 8192 tokens per step)
    #[arg(long, value_enum, default_value_t = Size::Small)]
    pub size: Size,
    /// Overrides the size's hidden width
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Overrides the size's expert width
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Overrides the size's expert count
    #[arg(long)]
    pub experts: Option<usize>,
    /// Overrides the size's experts per token
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Overrides the size's MoE layers (transformer blocks on text)
    #[arg(long)]
    pub layers: Option<usize>,
    /// Overrides the size's tokens per step (all ranks; on text a whole number of
    /// sequences per rank)
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Overrides the size's vocabulary (mapping only: text has one token per byte
    /// value)
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Overrides the size's sequence length (text)
    #[arg(long)]
    pub sequence: Option<usize>,
    /// Overrides the size's attention heads (text)
    #[arg(long)]
    pub heads: Option<usize>,
    /// No shared expert beside the routed ones (text)
    #[arg(long)]
    pub no_shared_expert: bool,
    /// Overrides the size's learning rate
    #[arg(long)]
    pub lr: Option<f64>,
    /// The held-out loss every this many steps (text; by default a tenth of the run)
    #[arg(long, value_parser = at_least_one)]
    pub eval_every: Option<usize>,
    /// Saves the model, the optimizer and the loss curve (`loss.svg`) here at the
    /// end (text): each rank its own experts, rank 0 the shared weights
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Continues the run saved here (text), with the same ranks and model
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Bytes to sample after the prompt at the end (text; 0: none)
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
    /// The sample's prompt
    #[arg(long, default_value = "Expert parallelism ")]
    pub prompt: String,
    /// Compile every CUDA kernel again instead of loading what an earlier run of
    /// this build compiled (kept under `target/kernel-cache/`)
    #[arg(long)]
    pub no_kernel_cache: bool,
}

const AFTER_HELP: &str = "Prints the loss (nats per byte on text, beside the unigram \
baseline and the held-out loss), tokens per second and the model's TFLOP/s (forward and \
backward products, per second of the whole run, compilation of the kernels included), \
then a sample of text. On a terminal the progress is a bar; elsewhere a line every tenth \
of the run.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    Text,
    Mapping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Size {
    Small,
    Gpu,
}

/// What the command line asks for, checked.
pub enum Job {
    Mapping(TrainConfig),
    Text {
        run: TextRun,
        corpus: Corpus,
        /// The step the run starts from: its checkpoint's, or 0.
        first: usize,
    },
}

/// Each figure given on the command line in place of the size's.
fn take_given<'a>(overrides: impl IntoIterator<Item = (Option<usize>, &'a mut usize)>) {
    for (given, figure) in overrides {
        if let Some(value) = given {
            *figure = value;
        }
    }
}

impl Options {
    /// The transport given, or by default the one a backend's devices want: rows by
    /// device copies on CUDA, through the host elsewhere.
    pub fn transport(&self) -> Transport {
        let default = if self.on_cuda() {
            Transport::CudaPeer
        } else {
            Transport::Local
        };
        self.transport.unwrap_or(default)
    }

    /// The steps given, or the task's default: about a minute on a 2-core CPU for
    /// text, a few seconds for mapping.
    pub fn steps(&self) -> usize {
        self.steps.unwrap_or(match self.task {
            Task::Text => 250,
            Task::Mapping => 300,
        })
    }

    /// Whether the backend is CUDA's, with or without fusion.
    pub fn on_cuda(&self) -> bool {
        matches!(self.backend, BackendName::Cuda | BackendName::CudaFusion)
    }

    /// The mapping task's model and batch, with the figures given beside the size.
    pub fn train_config(&self) -> TrainConfig {
        let mut config = match self.size {
            Size::Small => TrainConfig::default(),
            Size::Gpu => TrainConfig::gpu(),
        };
        let overrides = [
            (self.hidden, &mut config.hidden),
            (self.ffn, &mut config.ffn_hidden),
            (self.experts, &mut config.num_experts),
            (self.top_k, &mut config.top_k),
            (self.layers, &mut config.layers),
            (self.tokens, &mut config.global_tokens),
            (self.vocab, &mut config.vocab),
        ];
        take_given(overrides);
        if let Some(lr) = self.lr {
            config.learning_rate = lr;
        }
        config.sp_size = self.sp;
        config
    }

    /// The text task's run, with the figures given beside the size; the sequences
    /// per step are the tokens given, rounded down to whole sequences.
    pub fn text_run(&self) -> TextRun {
        let (mut shape, mut tokens, mut learning_rate) = match self.size {
            Size::Small => (
                LmShape {
                    hidden: 64,
                    heads: 4,
                    layers: 2,
                    sequence: 64,
                    num_experts: 8,
                    top_k: 2,
                    ffn_hidden: 128,
                    shared_expert: true,
                },
                1024,
                3e-3,
            ),
            Size::Gpu => (
                LmShape {
                    hidden: 1024,
                    heads: 16,
                    layers: 2,
                    sequence: 256,
                    num_experts: 64,
                    top_k: 6,
                    ffn_hidden: 1408,
                    shared_expert: true,
                },
                8192,
                1e-3,
            ),
        };
        let overrides = [
            (self.hidden, &mut shape.hidden),
            (self.ffn, &mut shape.ffn_hidden),
            (self.experts, &mut shape.num_experts),
            (self.top_k, &mut shape.top_k),
            (self.layers, &mut shape.layers),
            (self.sequence, &mut shape.sequence),
            (self.heads, &mut shape.heads),
            (self.tokens, &mut tokens),
        ];
        take_given(overrides);
        shape.shared_expert &= !self.no_shared_expert;
        if let Some(lr) = self.lr {
            learning_rate = lr;
        }
        TextRun {
            sequences: tokens / shape.sequence.max(1),
            shape,
            steps: self.steps(),
            learning_rate,
            sgd: false,
            seed: 7,
            eval_every: self.eval_every.unwrap_or_else(|| self.steps().div_ceil(10)),
            save: self.save.clone(),
            resume: self.resume.clone(),
            sample: self.sample,
            prompt: self.prompt.clone(),
        }
    }

    /// The job, or a message naming what is wrong with the options.
    pub fn job(&self) -> Result<Job, String> {
        let ranks = self.ranks;
        match self.task {
            Task::Mapping => {
                let text_only = [
                    ("--text", self.text.is_some()),
                    ("--save", self.save.is_some()),
                    ("--resume", self.resume.is_some()),
                    ("--sequence", self.sequence.is_some()),
                    ("--heads", self.heads.is_some()),
                ];
                if let Some((flag, _)) = text_only.iter().find(|(_, given)| *given) {
                    return Err(format!("{flag} is for --task text"));
                }
                let config = self.train_config();
                if !config.num_experts.is_multiple_of(ranks)
                    || !config.global_tokens.is_multiple_of(ranks)
                {
                    return Err(format!(
                        "--ranks {ranks} must divide {} experts and {} tokens",
                        config.num_experts, config.global_tokens
                    ));
                }
                Ok(Job::Mapping(config))
            }
            Task::Text => {
                if self.vocab.is_some() {
                    return Err(
                        "--vocab is for --task mapping: text has one token per byte value".into(),
                    );
                }
                let run = self.text_run();
                let shape = &run.shape;
                if shape.hidden == 0
                    || shape.heads == 0
                    || !shape.hidden.is_multiple_of(shape.heads)
                {
                    return Err(format!(
                        "--heads {} must divide --hidden {}",
                        shape.heads, shape.hidden
                    ));
                }
                if shape.sequence == 0 || !shape.num_experts.is_multiple_of(ranks) {
                    return Err(format!(
                        "--ranks {ranks} must divide {} experts, and --sequence must be at least 1",
                        shape.num_experts
                    ));
                }
                if run.sequences == 0 || !run.sequences.is_multiple_of(ranks) {
                    return Err(format!(
                        "{} tokens per step make {} sequences of {}: --ranks {ranks} must divide them (give --tokens a multiple of {})",
                        run.tokens_per_step().max(self.tokens.unwrap_or(0)),
                        run.sequences,
                        shape.sequence,
                        shape.sequence * ranks
                    ));
                }
                let mut first = 0;
                if let Some(dir) = &run.resume {
                    let saved = Manifest::read(dir).map_err(|e| e.to_string())?;
                    saved
                        .check_resumable_as(&run.manifest(saved.step, ranks))
                        .map_err(|e| e.to_string())?;
                    if saved.step >= run.steps {
                        return Err(format!(
                            "the checkpoint in {} is at step {}: --steps {} leaves nothing to train",
                            dir.display(),
                            saved.step,
                            run.steps
                        ));
                    }
                    first = saved.step;
                }
                let sources = match &self.text {
                    Some(path) => vec![path.clone()],
                    None => text::default_sources(),
                };
                let corpus = Corpus::read(&sources, shape.sequence).map_err(|e| e.to_string())?;
                Ok(Job::Text { run, corpus, first })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_override_the_size_wherever_they_stand() {
        let gpu = TrainConfig::gpu();
        for args in [
            ["train_moe", "--size", "gpu", "--hidden", "64"],
            ["train_moe", "--hidden", "64", "--size", "gpu"],
        ] {
            let config = Options::try_parse_from(args).unwrap().train_config();
            assert_eq!(config.hidden, 64);
            assert_eq!(config.num_experts, gpu.num_experts);
            assert_eq!(config.global_tokens, gpu.global_tokens);
        }
        let small = Options::try_parse_from(["train_moe"])
            .unwrap()
            .train_config();
        assert_eq!(small.hidden, TrainConfig::default().hidden);
    }

    #[test]
    fn the_transport_follows_the_backend_unless_given() {
        let transport = |args: &[&str]| Options::try_parse_from(args).unwrap().transport();
        assert_eq!(transport(&["train_moe"]), Transport::Local);
        assert_eq!(
            transport(&["train_moe", "--backend", "cuda"]),
            Transport::CudaPeer
        );
        assert_eq!(
            transport(&["train_moe", "--backend", "cuda", "--transport", "local"]),
            Transport::Local
        );
        assert_eq!(
            transport(&["train_moe", "--backend", "wgpu"]),
            Transport::Local
        );
    }

    #[test]
    fn a_bad_value_is_refused_and_named() {
        for (flag, value) in [
            ("--size", "huge"),
            ("--backend", "tpu"),
            ("--transport", "infiniband"),
            ("--steps", "0"),
            ("--hidden", "wide"),
        ] {
            let message = Options::try_parse_from(["train_moe", flag, value])
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(value) && message.contains(flag),
                "{message}"
            );
        }
    }

    /// The text task's figures: the size's, overridden where given, in sequences.
    #[test]
    fn the_text_run_takes_its_figures_from_the_size_and_the_flags() {
        let parse = |args: &[&str]| Options::try_parse_from(args).unwrap();
        let small = parse(&["train_moe"]).text_run();
        assert_eq!(
            (small.shape.hidden, small.tokens_per_step(), small.steps),
            (64, 1024, 250)
        );
        assert!(small.shape.shared_expert);
        let given = parse(&[
            "train_moe",
            "--size",
            "gpu",
            "--sequence",
            "128",
            "--tokens",
            "4096",
            "--heads",
            "8",
            "--no-shared-expert",
            "--lr",
            "0.5",
            "--steps",
            "7",
        ])
        .text_run();
        assert_eq!(given.shape.hidden, 1024);
        assert_eq!(
            (given.shape.sequence, given.sequences, given.shape.heads),
            (128, 32, 8)
        );
        assert!(!given.shape.shared_expert);
        assert_eq!(
            (given.learning_rate, given.steps, given.eval_every),
            (0.5, 7, 1)
        );
        assert_eq!(parse(&["train_moe", "--task", "mapping"]).steps(), 300);
    }

    /// Options that do not fit the task or each other are refused, naming them.
    #[test]
    fn options_that_do_not_fit_are_named() {
        let refusal = |args: &[&str]| match Options::try_parse_from(args).unwrap().job() {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(message) => message,
        };
        for (args, named) in [
            (&["train_moe", "--vocab", "10"][..], "--vocab"),
            (
                &["train_moe", "--task", "mapping", "--save", "out"],
                "--save",
            ),
            (
                &["train_moe", "--task", "mapping", "--heads", "2"],
                "--heads",
            ),
            (&["train_moe", "--heads", "3"], "--heads 3"),
            (&["train_moe", "--ranks", "3"], "--ranks 3"),
            (&["train_moe", "--tokens", "96"], "--ranks 4"),
            (&["train_moe", "--text", "no/such/folder"], "no/such/folder"),
            (
                &["train_moe", "--resume", "no/such/checkpoint"],
                "no/such/checkpoint",
            ),
            (
                &["train_moe", "--task", "mapping", "--ranks", "3"],
                "--ranks 3",
            ),
        ] {
            let message = refusal(args);
            assert!(message.contains(named), "{args:?}: {message}");
        }
    }
}
