use std::process::ExitCode;

use clap::Parser;

/// glibc's malloc and free were a fifth of the server's CPU time under
/// load (every event is parsed into a tree of small strings and maps, and
/// freed again), much of it merging freed blocks; mimalloc's per-thread
/// free lists make those calls a few instructions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    sluice::cli::run(sluice::cli::Cli::parse())
}
