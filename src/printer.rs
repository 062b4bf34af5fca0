//! All progress and messages go to stderr through one printer (uv's `Printer`): quiet, normal or
//! verbose, with progress bars only when stderr is a terminal. stdout stays clean for scripts.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

#[derive(Debug, Clone, Copy)]
pub struct Printer {
    pub verbosity: Verbosity,
    progress: bool,
}

impl Printer {
    pub fn new(verbosity: Verbosity) -> Self {
        let progress = verbosity != Verbosity::Quiet && std::io::stderr().is_terminal();
        Self { verbosity, progress }
    }

    /// A normal message (hidden with -q).
    pub fn info(&self, msg: impl AsRef<str>) {
        if self.verbosity >= Verbosity::Normal {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A detail shown with -v.
    pub fn verbose(&self, msg: impl AsRef<str>) {
        if self.verbosity >= Verbosity::Verbose {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A warning (shown unless -q).
    pub fn warn(&self, msg: impl AsRef<str>) {
        if self.verbosity >= Verbosity::Normal {
            eprintln!("warning: {}", msg.as_ref());
        }
    }

    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        let target = if self.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }

    /// The denoising-steps bar.
    pub fn steps_bar(&self, len: usize) -> ProgressBar {
        self.bar(len as u64, "{msg:>10} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta}")
    }

    /// The batch view: an overall bar (files, ETA) with the per-image step bar below it.
    pub fn batch_bars(&self, files: usize) -> (ProgressBar, ProgressBar) {
        let multi = indicatif::MultiProgress::with_draw_target(if self.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall =
            multi.add(self.bar(files as u64, "{msg:>10} [{bar:30}] {pos}/{len} files, {elapsed} elapsed, ETA {eta}"));
        overall.set_message("images");
        let steps = multi.add(self.steps_bar(0));
        (overall, steps)
    }

    /// A download bar for one file.
    pub fn bytes_bar(&self, len: u64, name: &str) -> ProgressBar {
        let bar = self.bar(len, "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, ETA {eta}");
        bar.set_message(name.to_string());
        bar
    }
}
