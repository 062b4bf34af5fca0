//! The `ghiblify` binary: parse → settings → run → exit code. Nothing else lives here.

mod cli;

use clap::Parser;
use std::process::ExitCode;

// Why this allocator: src/alloc.rs.
#[global_allocator]
static GLOBAL: ghiblify::alloc::Allocator = ghiblify::alloc::Allocator {};

fn main() -> ExitCode {
    ghiblify::alloc::keep_freed_memory();
    let args = match cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version: stdout, status 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors get the same one-line shape and exit status as every other error.
            eprintln!("ghiblify: {} (see --help)", usage_line(&e));
            return ExitCode::from(1);
        }
    };
    match args.into_settings().and_then(|s| ghiblify::run::run(&s)) {
        // Some files of a batch failed (each said why on its own line): 2, like ripgrep.
        Ok(outcome) if outcome.failed > 0 => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ghiblify: {}", cli::message(e));
            ExitCode::from(1)
        }
    }
}

/// One line for a clap usage error, from its kind and context (not its rendered, reflowed text).
fn usage_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let ctx = |k: ContextKind| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(", "),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let arg = ctx(ContextKind::InvalidArg);
    let value = ctx(ContextKind::InvalidValue);
    match e.kind() {
        ErrorKind::InvalidValue => {
            let valid = ctx(ContextKind::ValidValue);
            let valid = if valid.is_empty() { String::new() } else { format!(" (possible values: {valid})") };
            format!("{arg}: invalid value '{value}'{valid}")
        }
        ErrorKind::ValueValidation => format!("{arg}: invalid value '{value}': {}", source_line(e)),
        ErrorKind::UnknownArgument => {
            let hint = ctx(ContextKind::SuggestedArg);
            let hint = if hint.is_empty() { String::new() } else { format!(" (did you mean {hint}?)") };
            format!("unknown argument '{arg}'{hint}")
        }
        ErrorKind::MissingRequiredArgument => format!("missing required argument {arg}"),
        ErrorKind::ArgumentConflict => format!("{arg} cannot be used with {}", ctx(ContextKind::PriorArg)),
        ErrorKind::NoEquals | ErrorKind::TooFewValues | ErrorKind::WrongNumberOfValues | ErrorKind::TooManyValues => {
            format!("{arg}: wrong number of values")
        }
        ErrorKind::InvalidUtf8 => format!("{arg}: the value is not valid UTF-8"),
        _ => {
            // Kinds without structured context: the first line of clap's own message.
            let text = e.render().to_string();
            text.lines().next().unwrap_or_default().trim_start_matches("error: ").trim().to_string()
        }
    }
}

/// The innermost cause of a validation error ("invalid digit found in string").
fn source_line(e: &clap::Error) -> String {
    use std::error::Error as _;
    let mut src: Option<&dyn std::error::Error> = e.source();
    let mut last = String::new();
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    last
}
