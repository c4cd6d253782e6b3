//! The `sluice` command line. `main.rs` parses it and dispatches here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::author::build::{self, BuildOptions, Toolchain};
use crate::author::scaffold::{self, SdkSource};
use crate::author::test_run::{self, TestOptions};

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: a CDP event pipeline with sandboxed WebAssembly plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write, build and try plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a plugin crate that builds and tests out of the box.
    New {
        /// Plugin name: lowercase letters, digits and dashes.
        name: String,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to a plugin-sdk checkout (default: the one this binary was
        /// built from).
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
    /// Build plugin crates into NAME.wasm components, all in one cargo run.
    Build {
        /// Plugin directories (default: the current one).
        paths: Vec<PathBuf>,
        /// Write the .wasm files here instead of into each plugin directory.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Toolchain to use (default: rustup's wasm target if installed,
        /// else the offline Debian fallback).
        #[arg(long, value_enum, env = "SLUICE_WASM_TOOLCHAIN")]
        toolchain: Option<ToolchainArg>,
    },
    /// Run a built plugin on sample events and print events, logs and HTTP
    /// calls as JSON.
    Test {
        /// The plugin's .wasm file.
        plugin: PathBuf,
        /// Event JSON (inline or a file): one event, an array, or {"batch": [...]}.
        #[arg(long)]
        event: String,
        /// Config JSON (inline or a file).
        #[arg(long)]
        config: Option<String>,
        /// Let the plugin call loopback addresses, for local test servers.
        #[arg(long)]
        allow_loopback: bool,
        /// Call the export hook even if the plugin also transforms.
        #[arg(long)]
        export: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ToolchainArg {
    Rustup,
    Fallback,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Plugin(command) => match plugin(command) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn plugin(command: PluginCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginCommand::New {
            name,
            dir,
            sdk_path,
        } => {
            let sdk = match sdk_path {
                Some(path) => SdkSource::Path(path.canonicalize()?),
                None => SdkSource::from_checkout().ok_or_else(|| {
                    anyhow::anyhow!(
                        "cannot find plugin-sdk next to this binary's source; pass --sdk-path PATH/TO/sluice/plugin-sdk"
                    )
                })?,
            };
            let created = scaffold::scaffold(&name, &dir, &sdk)?;
            println!("created {}", created.display());
            println!(
                "next: cd {} && cargo test && sluice plugin build && sluice plugin test {name}.wasm --event sample.json",
                created.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Build {
            paths,
            out_dir,
            toolchain,
        } => {
            let built = build::build(&BuildOptions {
                paths,
                out_dir,
                toolchain: toolchain.map(|t| match t {
                    ToolchainArg::Rustup => Toolchain::Rustup,
                    ToolchainArg::Fallback => Toolchain::Fallback,
                }),
            })?;
            for plugin in built {
                println!(
                    "built {}@{} -> {} ({} bytes, sha256 {})",
                    plugin.name,
                    plugin.version,
                    plugin.path.display(),
                    plugin.bytes,
                    plugin.sha256
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Test {
            plugin,
            event,
            config,
            allow_loopback,
            export,
        } => {
            let report = test_run::run(
                &plugin,
                &TestOptions {
                    events: event,
                    config,
                    allow_loopback,
                    export,
                },
            )?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            match &report.error {
                Some(error) => {
                    eprintln!("error: {error}");
                    Ok(ExitCode::FAILURE)
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
    }
}
