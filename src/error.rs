//! The library's error type: every variant carries the file, key or flag and the value, so the
//! binary can print one line that tells the user what to fix (`{:#}` of the anyhow chain).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-facing argument is out of range or inconsistent (names the flag and the value).
    #[error("{0}")]
    Argument(String),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model folder lacks a component or a file.
    #[error("model folder '{}': {what}", dir.display())]
    Model { dir: PathBuf, what: String },

    /// A JSON config that does not parse, or a key with a value we cannot honour.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// Weights that do not match the architecture their config describes.
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },

    #[error("tokenizer '{}': {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    /// An input or output image.
    #[error("{}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    /// Fetching model files from the hub.
    #[error("{0}")]
    Hub(String),

    /// A tensor operation failed (a bug or an out-of-memory, not a user error).
    #[error("tensor operation failed: {0}")]
    Candle(String),
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
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), msg: msg.into() }
    }
    pub fn image(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Image { path: path.into(), msg: msg.to_string() }
    }
}
