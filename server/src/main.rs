use std::process::ExitCode;

use clap::Parser;
use sluice::cli::{Cli, LogFormat};

/// glibc's malloc and free were a fifth of the server's CPU time under
/// load (every event is parsed into a tree of small strings and maps, and
/// freed again), much of it merging freed blocks; mimalloc's per-thread
/// free lists make those calls a few instructions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "warn".into())
        .add_directive(
            format!("{}=info", sluice::cli::LISTENING_TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // One JSON object a line: timestamp, level, target, and the
        // event's fields with its message under `fields.message`.
        LogFormat::Json => logs.json().init(),
    }
    sluice::cli::run(cli)
}
