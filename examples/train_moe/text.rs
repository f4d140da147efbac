//! The text `train_moe` learns: bytes read from files at start-up, split into a
//! training and a held-out part, and cut into the step's sequences.

use std::fmt;
use std::path::{Path, PathBuf};

use ep_core::synthetic::SplitMix64;

/// A byte vocabulary: every byte value is a token.
pub const VOCAB: usize = 256;

/// The share of the text held out for the evaluation loss (its last bytes).
const HELD_OUT: f64 = 0.1;

/// Why no text could be read.
#[derive(Debug)]
pub enum TextError {
    Unreadable {
        path: PathBuf,
        reason: String,
    },
    /// Fewer bytes than two sequences need (one to train on, one held out).
    TooShort {
        path: PathBuf,
        bytes: usize,
        needed: usize,
    },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable { path, reason } => {
                write!(f, "cannot read text from {}: {reason}", path.display())
            }
            Self::TooShort {
                path,
                bytes,
                needed,
            } => write!(
                f,
                "{} holds {bytes} bytes of text; this model needs at least {needed}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TextError {}

/// The files of the default corpus: the repository's own prose (the book's chapters
/// and the README), found from the source tree this program was built in, else
/// from the current folder (a copy of the repository without its build).
pub fn default_sources() -> Vec<PathBuf> {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = if built_in.join("book/src").is_dir() {
        built_in
    } else {
        PathBuf::from(".")
    };
    vec![root.join("book/src"), root.join("README.md")]
}

/// The bytes of `path`: a file's, or every file's under a folder, in the order of
/// their paths (so every rank and every run reads the same text).
fn read_bytes(path: &Path, into: &mut Vec<u8>) -> Result<(), TextError> {
    let unreadable = |e: std::io::Error| TextError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if path.is_dir() {
        let mut entries = std::fs::read_dir(path)
            .map_err(unreadable)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        entries.sort();
        for entry in entries {
            read_bytes(&entry, into)?;
        }
        Ok(())
    } else {
        let bytes = std::fs::read(path).map_err(unreadable)?;
        into.extend_from_slice(&bytes);
        into.push(b'\n');
        Ok(())
    }
}

/// Text cut into a training part and a held-out part.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Vec<u8>,
    pub held_out: Vec<u8>,
}

impl Corpus {
    /// Reads every source; fails naming the path that is unreadable, or the sources
    /// when together they are shorter than `sequence + 1` bytes in each part.
    pub fn read(sources: &[PathBuf], sequence: usize) -> Result<Self, TextError> {
        let mut text = Vec::new();
        for source in sources {
            read_bytes(source, &mut text)?;
        }
        let named = sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Self::from_bytes(text, sequence).map_err(|(bytes, needed)| TextError::TooShort {
            path: PathBuf::from(named),
            bytes,
            needed,
        })
    }

    /// The last tenth held out; `Err((bytes, needed))` when a part would be shorter
    /// than one sequence and its next byte.
    pub fn from_bytes(text: Vec<u8>, sequence: usize) -> Result<Self, (usize, usize)> {
        let needed = ((sequence + 1) as f64 / HELD_OUT).ceil() as usize;
        if text.len() < needed {
            return Err((text.len(), needed));
        }
        let cut = text.len() - (text.len() as f64 * HELD_OUT) as usize;
        Ok(Self {
            held_out: text[cut..].to_vec(),
            train: text[..cut].to_vec(),
        })
    }

    /// The entropy (nats) of the training part's byte frequencies, measured on the
    /// held-out part: the loss of a model that knows only how often each byte comes.
    pub fn unigram_loss(&self) -> f64 {
        let mut counts = [1.0f64; VOCAB];
        for &b in &self.train {
            counts[b as usize] += 1.0;
        }
        let total: f64 = counts.iter().sum();
        let loss: f64 = self
            .held_out
            .iter()
            .map(|&b| -(counts[b as usize] / total).ln())
            .sum();
        loss / self.held_out.len() as f64
    }
}

/// `count` sequences of `sequence` tokens from `text`, each with its targets (the
/// next bytes), starting at positions drawn from `seed`: the inputs and targets,
/// `count * sequence` each, sequence after sequence.
pub fn sequences(text: &[u8], sequence: usize, count: usize, seed: u64) -> (Vec<i64>, Vec<i64>) {
    let mut rng = SplitMix64::new(seed);
    let starts = text.len() - sequence;
    let mut inputs = Vec::with_capacity(count * sequence);
    let mut targets = Vec::with_capacity(count * sequence);
    for _ in 0..count {
        let at = rng.below(starts);
        inputs.extend(text[at..at + sequence].iter().map(|&b| b as i64));
        targets.extend(text[at + 1..at + sequence + 1].iter().map(|&b| b as i64));
    }
    (inputs, targets)
}

/// This rank's share of `all` (a whole number of sequences of `per` tokens each,
/// as many per rank).
pub fn rank_share<T: Clone>(all: &[T], rank: usize, world: usize) -> Vec<T> {
    let per_rank = all.len() / world;
    all[rank * per_rank..(rank + 1) * per_rank].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_next_bytes() {
        let text: Vec<u8> = (0..100).collect();
        let (inputs, targets) = sequences(&text, 8, 5, 3);
        assert_eq!(inputs.len(), 40);
        for (i, t) in inputs.iter().zip(&targets) {
            assert_eq!(i + 1, *t);
        }
    }

    #[test]
    fn the_held_out_part_is_the_end_and_never_trained_on() {
        let text: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let corpus = Corpus::from_bytes(text.clone(), 16).unwrap();
        assert_eq!(corpus.train.len() + corpus.held_out.len(), 1000);
        assert_eq!(corpus.held_out.len(), 100);
        assert_eq!([corpus.train, corpus.held_out].concat(), text);
    }

    /// A uniform text's unigram loss is ln 256; a text of one byte's is near 0.
    #[test]
    fn the_unigram_baseline_is_the_byte_entropy() {
        let uniform: Vec<u8> = (0..=255).cycle().take(256 * 40).collect();
        let corpus = Corpus::from_bytes(uniform, 16).unwrap();
        assert!((corpus.unigram_loss() - (256f64).ln()).abs() < 0.01);
        let constant = Corpus::from_bytes(vec![b'a'; 10_000], 16).unwrap();
        assert!(constant.unigram_loss() < 0.05);
    }

    #[test]
    fn unreadable_and_short_texts_are_named() {
        let missing = PathBuf::from("no/such/text.txt");
        let e = Corpus::read(std::slice::from_ref(&missing), 16).unwrap_err();
        assert!(matches!(e, TextError::Unreadable { .. }), "{e}");
        assert!(e.to_string().contains("no/such/text.txt"), "{e}");

        let folder = std::env::temp_dir().join(format!("train_moe_short_{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("a.txt"), b"too short").unwrap();
        let e = Corpus::read(std::slice::from_ref(&folder), 16).unwrap_err();
        std::fs::remove_dir_all(&folder).unwrap();
        assert!(matches!(e, TextError::TooShort { bytes: 10, .. }), "{e}");
        assert!(e.to_string().contains("10 bytes"), "{e}");
    }

    /// The default corpus is there in a checkout and reads.
    #[test]
    fn the_default_corpus_is_the_repository_prose() {
        let corpus = Corpus::read(&default_sources(), 64).unwrap();
        assert!(corpus.train.len() > 50_000, "{}", corpus.train.len());
        let unigram = corpus.unigram_loss();
        assert!(unigram > 2.0 && unigram < 4.0, "{unigram}");
    }
}
