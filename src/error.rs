//! The library's error type: every variant carries the file, key or setting and the value, so the
//! binary can print one line that tells the user what to fix (`{:#}` of the anyhow chain). Each
//! failure has its own variant, and [`Error::aborts_batch`] says which ones end a whole batch.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting's value is out of range or does not fit the model. `setting` is the value's name
    /// (`steps`, `strength`, ...), which the command line maps to its flag; `msg` continues the
    /// sentence ("must be within [1, 1000], got 5000").
    #[error("{setting} {msg}")]
    Setting { setting: &'static str, msg: String },

    /// Settings that do not fit together, or an input or output path named on the command line
    /// that cannot be used (the message names the flag or the path).
    #[error("{0}")]
    Usage(String),

    /// A file-system operation on `path` failed. The OS error is part of this message, not a
    /// separate cause, so the one-line chain says it once.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },

    /// A model folder lacks a component or a file.
    #[error("model folder '{}': {what}", dir.display())]
    Model { dir: PathBuf, what: String },

    /// A JSON config that does not parse, or a key with a value we cannot honour.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// Weights that do not match the architecture their config describes, or a LoRA that does not fit.
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },

    #[error("tokenizer '{}': {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    /// An input photo that cannot be read or used.
    #[error("{}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    /// A file we must not write (an input, another output of the run) or could not encode.
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },

    /// Fetching model files from the hub (the message names the repo, file and revision).
    #[error("{0}")]
    Hub(String),

    /// The hub has the repo but not this revision (a pinned preset falls back to `main` on it).
    #[error("hub repo '{repo}' has no revision '{revision}' (404)")]
    NoRevision { repo: String, revision: String },

    /// A model, LoRA or setting produced NaN or infinite values (the text names where first).
    #[error("{0} holds NaN or infinite values (the model's weights, a LoRA or the settings push it out of range)")]
    NonFinite(String),

    /// A tensor operation failed (out of memory, or a bug; not a user error).
    #[error("tensor operation failed: {0}")]
    Candle(String),

    /// Replayed or recorded data that does not fit the run (tests, `--trace`).
    #[error("{0}")]
    Replay(String),
}

/// candle appends a backtrace to its message when RUST_BACKTRACE is set: keep the first line.
pub fn candle_message(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(candle_message(&e))
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), msg: msg.into() }
    }
    pub fn image(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Image { path: path.into(), msg: msg.to_string() }
    }
    pub fn output(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Output { path: path.into(), msg: msg.to_string() }
    }
    pub fn setting(setting: &'static str, msg: impl Into<String>) -> Self {
        Error::Setting { setting, msg: msg.into() }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    /// Whether this failure, met while converting one file of a batch, would fail every other
    /// file too (a setting the model cannot honour, a model that does not load, a refused
    /// download), so the batch ends with it at once instead of repeating it per file. A problem
    /// with one photo, one output path or one tensor operation (a picture too big for memory)
    /// is that file's alone.
    pub fn aborts_batch(&self) -> bool {
        !matches!(self, Error::Image { .. } | Error::Output { .. } | Error::Io { .. } | Error::Candle(_))
    }
}
