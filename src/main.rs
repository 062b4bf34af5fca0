//! The `ghiblify` binary: parse → settings → run → exit code. Nothing else lives here.

use clap::Parser;
use std::process::ExitCode;

// Why this allocator: src/alloc.rs.
#[global_allocator]
static GLOBAL: ghiblify::alloc::Allocator = ghiblify::alloc::Allocator {};

fn main() -> ExitCode {
    ghiblify::alloc::keep_freed_memory();
    let args = match ghiblify::cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version: stdout, status 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors get the same one-line shape and exit status as every other error.
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"))
                .collect();
            eprintln!("ghiblify: {} (see --help)", line.join(" "));
            return ExitCode::from(1);
        }
    };
    let result = ghiblify::settings::Settings::from_args(args).and_then(|s| ghiblify::run::run(&s));
    match result {
        // Some files of a batch failed (each said why on its own line): 2, like ripgrep.
        Ok(outcome) if outcome.failed > 0 => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ghiblify: {:#}", anyhow::Error::from(e));
            ExitCode::from(1)
        }
    }
}
