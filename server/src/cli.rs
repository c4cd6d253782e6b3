//! The `sluice` command line. `main.rs` parses it and dispatches here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admin;
use crate::author::build::{self, BuildOptions, Toolchain};
use crate::author::scaffold::{self, SdkSource};
use crate::author::test_run::{self, TestOptions};
use crate::model::Quotas;
use crate::query::QueryLimits;
use crate::runtime::Policy;
use crate::server::{ServeConfig, open_store};
use crate::store::{KEY_ENV, KEY_FILE, KeySource, StoreConfig};

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: a CDP event pipeline with sandboxed WebAssembly plugins"
)]
pub struct Cli {
    /// Log lines as text for people, or as one JSON object a line for log
    /// collectors.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: capture API, pipeline worker, query API.
    // Boxed: its many options would make every command as large.
    Serve(Box<ServeArgs>),
    /// Manage organisations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Manage projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Manage personal API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage capture tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Write, build and try plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// The key that seals secret config values.
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

/// Where the data lives.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Directory of the embedded SQLite database (the default store)
    /// [default: sluice-data].
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL URL (postgres://user@host/db) to use instead of SQLite;
    /// several `sluice serve` processes may share it.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

impl StoreArgs {
    /// The data dir, whichever backend holds the data: the key file's
    /// default place.
    fn data_dir(&self, file: &FileConfig) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("sluice-data"))
    }

    /// PostgreSQL if a URL is given (here or in the config file), else
    /// SQLite in the data dir.
    pub fn config(self, file: &FileConfig) -> StoreConfig {
        let url = self.database_url.or_else(|| file.database_url.clone());
        match url.filter(|url| !url.is_empty()) {
            Some(url) => StoreConfig::Postgres { url },
            None => StoreConfig::Sqlite {
                data_dir: self
                    .data_dir
                    .or_else(|| file.data_dir.clone())
                    .unwrap_or_else(|| PathBuf::from("sluice-data")),
            },
        }
    }
}

/// Where the key that seals secret config values is.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The file of the key that seals secret config values: base64 keys,
    /// one a line, the first sealing and every one opening. Made on first
    /// start if nothing is sealed yet. `SLUICE_SECRET_KEY`, holding the
    /// same text, wins over it [default: DATA_DIR/secret.key].
    #[arg(long, env = "SLUICE_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// The flag, else the config file's `secret_key_file`, else the data
    /// dir's `secret.key`; `SLUICE_SECRET_KEY` over all of them.
    fn source(self, store: &StoreArgs, file: &FileConfig) -> KeySource {
        let path = self
            .secret_key_file
            .or_else(|| file.secret_key_file.clone())
            .unwrap_or_else(|| store.data_dir(file).join(KEY_FILE));
        KeySource {
            key: std::env::var(KEY_ENV)
                .ok()
                .filter(|key| !key.trim().is_empty()),
            file: path,
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config file; flags and environment variables override it.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8000].
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Largest accepted request body in bytes, before and after
    /// decompression [default: 20971520].
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Queued events at which capture starts answering 503 [default: 1000000].
    #[arg(long, env = "SLUICE_MAX_QUEUE_DEPTH")]
    pub max_queue_depth: Option<i64>,
    /// Seconds the oldest queued event may have waited before capture
    /// starts answering 503 [default: 30].
    #[arg(long, env = "SLUICE_MAX_QUEUE_AGE_SECONDS")]
    pub max_queue_age_seconds: Option<u64>,
    /// Seconds a capture request's body may take to arrive before the
    /// request gets 408 [default: 30].
    #[arg(long, env = "SLUICE_CAPTURE_BODY_TIMEOUT_SECONDS")]
    pub capture_body_timeout_seconds: Option<u64>,
    /// Seconds an API request's body may take to arrive before the
    /// request gets 408 [default: 30].
    #[arg(long, env = "SLUICE_API_BODY_TIMEOUT_SECONDS")]
    pub api_body_timeout_seconds: Option<u64>,
    /// Seconds a capture request may take in all before it gets 503
    /// [default: 60].
    #[arg(long, env = "SLUICE_CAPTURE_REQUEST_TIMEOUT_SECONDS")]
    pub capture_request_timeout_seconds: Option<u64>,
    /// Do not record the client address as `$ip`.
    #[arg(long, env = "SLUICE_NO_IP")]
    pub no_ip: bool,
    /// Seconds a worker holds claimed events before another process may take
    /// them over after a crash [default: 30].
    #[arg(long, env = "SLUICE_LEASE_SECONDS")]
    pub lease_seconds: Option<u64>,
    /// Longest an analytics query may run, in seconds [default: 30].
    #[arg(long, env = "SLUICE_QUERY_TIMEOUT_SECONDS")]
    pub query_timeout_seconds: Option<f64>,
    /// Most stored events one analytics query may read [default: 5000000].
    #[arg(long, env = "SLUICE_QUERY_MAX_ROWS")]
    pub query_max_rows: Option<u64>,
    /// Analytics queries running at once across all projects; each
    /// project also keeps to its `concurrent_queries` quota [default: 4].
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_QUERIES")]
    pub max_concurrent_queries: Option<u32>,
    /// Connections held open at once; past it the server accepts no more
    /// until one closes [default: half the process's file descriptor
    /// limit, at most 10000].
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a connection may take to send a request's headers, and may
    /// stay idle between requests, before it is closed [default: 30].
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT_SECONDS")]
    pub header_timeout_seconds: Option<u64>,
    /// Addresses or networks of the reverse proxies in front of the server,
    /// comma-separated: only their `X-Forwarded-For` is believed for `$ip`
    /// [default: 127.0.0.0/8,::1].
    #[arg(long, env = "SLUICE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Management and query API requests one personal API key may make per
    /// second, with bursts of twice as many; past it the API answers 429
    /// with `Retry-After` [default: 100].
    #[arg(long, env = "SLUICE_API_REQUESTS_PER_SECOND")]
    pub api_requests_per_second: Option<u32>,
    /// Addresses or networks, comma-separated, whose clients `/metrics`
    /// answers; others get 403 [default: 127.0.0.0/8,::1].
    #[arg(long, env = "SLUICE_METRICS_ALLOW", value_delimiter = ',')]
    pub metrics_allow: Option<Vec<String>>,
    /// Seconds the server goes on serving after SIGTERM or Ctrl-C, with
    /// `/_ready` answering 503, before it stops accepting [default: 0].
    #[arg(long, env = "SLUICE_SHUTDOWN_DELAY_SECONDS")]
    pub shutdown_delay_seconds: Option<u64>,
    /// A default quota of every project, as NAME=VALUE (repeatable); see
    /// docs/operators.md for the names. `sluice project quotas` sets one
    /// project's.
    #[arg(long = "quota", value_name = "NAME=VALUE")]
    pub quotas: Vec<String>,
}

/// The config file of `sluice serve --config FILE`: the same settings as the
/// flags, plus `[plugins]`, the operator's policy for plugins.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub secret_key_file: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    pub max_queue_depth: Option<i64>,
    pub max_queue_age_seconds: Option<u64>,
    pub capture_body_timeout_seconds: Option<u64>,
    pub api_body_timeout_seconds: Option<u64>,
    pub capture_request_timeout_seconds: Option<u64>,
    pub record_ip: Option<bool>,
    pub lease_seconds: Option<u64>,
    pub query_timeout_seconds: Option<f64>,
    pub query_max_rows: Option<u64>,
    pub max_concurrent_queries: Option<u32>,
    pub max_connections: Option<usize>,
    pub header_timeout_seconds: Option<u64>,
    pub trusted_proxies: Option<Vec<String>>,
    pub api_requests_per_second: Option<u32>,
    pub metrics_allow: Option<Vec<String>>,
    pub shutdown_delay_seconds: Option<u64>,
    pub plugins: Option<Policy>,
    /// The default quotas of every project; see `model::Quotas`.
    pub quotas: Option<Quotas>,
}

impl FileConfig {
    pub fn read(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path).map_err(|err| {
            anyhow::anyhow!("failed to read the config file {}: {err}", path.display())
        })?;
        toml::from_str(&text)
            .map_err(|err| anyhow::anyhow!("the config file {} is invalid: {err}", path.display()))
    }
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project; prints {"project_id", "organisation_id",
    /// "capture_token", "api_key"}, the key being an admin key of this
    /// project alone.
    Create {
        /// Project name.
        #[arg(long)]
        name: String,
        /// The organisation to create it in [default: a new organisation
        /// of the project's name].
        #[arg(long)]
        organisation: Option<String>,
        /// The IANA time zone its analytics queries bucket days in, such
        /// as Europe/Berlin.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List projects, of every organisation or of one; prints one JSON
    /// object per line.
    List {
        #[arg(long)]
        organisation: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show or change one project's quotas; prints {"project_id",
    /// "overrides", "quotas"}. Running servers apply a change within
    /// seconds.
    Quotas {
        /// The project's id.
        project_id: String,
        /// Override a quota for this project, as NAME=VALUE (repeatable).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Drop this project's override of a quota, back to the default
        /// (repeatable).
        #[arg(long = "unset", value_name = "NAME")]
        unset: Vec<String>,
        /// The server's config file, for its `[quotas]` defaults.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organisation with an admin key of all its projects;
    /// prints {"organisation_id", "name", "api_key", "key_id"}.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List organisations; prints one JSON object per line.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a personal API key; prints it once with its id. Only its hash
    /// is stored.
    Create {
        /// The organisation the key belongs to.
        #[arg(long)]
        organisation: String,
        /// What the key is for, to tell keys apart in lists.
        #[arg(long)]
        name: String,
        /// read, write or admin.
        #[arg(long)]
        scope: String,
        /// Limit the key to this project (repeatable); without it the key
        /// reaches every project of the organisation.
        #[arg(long = "project")]
        projects: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List an organisation's keys (never the keys themselves); prints one
    /// JSON object per line.
    List {
        #[arg(long)]
        organisation: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key at once; prints it as it now is.
    Revoke {
        /// The key's id (from `sluice key list`), not the key itself.
        key_id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Give a project a new capture token; the old one is still accepted
    /// for the grace period. Prints {"capture_token", "previous_valid_until"}.
    Rotate {
        #[arg(long)]
        project: String,
        /// How long the old token is still accepted, in seconds (at most 30
        /// days) [default: 86400].
        #[arg(long, default_value_t = 86_400)]
        grace_seconds: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Print a new random key (base64 of 32 bytes) for a key file.
    NewKey,
    /// Seal every secret config value again under the first key of the
    /// key file (or `SLUICE_SECRET_KEY`); prints {"key_id", "resealed",
    /// "sealed", "skipped"}. Servers keep opening values sealed with any
    /// key they hold, so run it once every server holds the new key.
    Rotate {
        /// The server's config file, for its data dir, database and key
        /// file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// For a lost key: drop every secret value sealed with KEY_ID (they
    /// cannot be read without it) so servers start without the key; prints
    /// {"key_id", "dropped": [{"plugin_config_id", "field"}]}, the secrets
    /// to give again through the API.
    Forget {
        /// The lost key's id, as the server's error names it.
        key_id: String,
        /// The server's config file, for its data dir and database.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
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
    let format = cli.log_format;
    let result = match cli.command {
        Command::Serve(args) => serve(*args, format),
        Command::Org(command) => tenancy(TenancyCommand::Org(command)),
        Command::Project(command) => project(command),
        Command::Key(command) => tenancy(TenancyCommand::Key(command)),
        Command::Token(command) => tenancy(TenancyCommand::Token(command)),
        Command::Plugin(command) => plugin(command),
        Command::Secrets(command) => secrets(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            match format {
                LogFormat::Text => eprintln!("error: {err:#}"),
                LogFormat::Json => tracing::error!("{err:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The target of the line that says where the server listens: always
/// logged in JSON mode, whatever `SLUICE_LOG` says, as tools wait for it.
pub const LISTENING_TARGET: &str = "sluice::listening";

fn serve(args: ServeArgs, format: LogFormat) -> anyhow::Result<ExitCode> {
    let file = FileConfig::read(args.config.as_deref())?;
    let defaults = ServeConfig::with_data_dir(PathBuf::new());
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)));
    let config = ServeConfig {
        max_body_bytes: args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(defaults.max_body_bytes),
        max_queue_depth: args
            .max_queue_depth
            .or(file.max_queue_depth)
            .unwrap_or(defaults.max_queue_depth),
        max_queue_age: match args.max_queue_age_seconds.or(file.max_queue_age_seconds) {
            Some(0) => anyhow::bail!("--max-queue-age-seconds must be at least 1"),
            Some(seconds) => std::time::Duration::from_secs(seconds),
            None => defaults.max_queue_age,
        },
        capture_body_timeout: match args
            .capture_body_timeout_seconds
            .or(file.capture_body_timeout_seconds)
        {
            Some(0) => anyhow::bail!("--capture-body-timeout-seconds must be at least 1"),
            Some(seconds) => std::time::Duration::from_secs(seconds),
            None => defaults.capture_body_timeout,
        },
        api_body_timeout: match args
            .api_body_timeout_seconds
            .or(file.api_body_timeout_seconds)
        {
            Some(0) => anyhow::bail!("--api-body-timeout-seconds must be at least 1"),
            Some(seconds) => std::time::Duration::from_secs(seconds),
            None => defaults.api_body_timeout,
        },
        capture_request_timeout: match args
            .capture_request_timeout_seconds
            .or(file.capture_request_timeout_seconds)
        {
            Some(0) => anyhow::bail!("--capture-request-timeout-seconds must be at least 1"),
            Some(seconds) => std::time::Duration::from_secs(seconds),
            None => defaults.capture_request_timeout,
        },
        record_ip: !args.no_ip && file.record_ip.unwrap_or(true),
        lease: args
            .lease_seconds
            .or(file.lease_seconds)
            .map(|s| std::time::Duration::from_secs(s.max(1)))
            .unwrap_or(defaults.lease),
        query_limits: QueryLimits {
            timeout: match args.query_timeout_seconds.or(file.query_timeout_seconds) {
                Some(seconds) if seconds.is_finite() && seconds > 0.0 => {
                    std::time::Duration::from_secs_f64(seconds)
                }
                Some(seconds) => anyhow::bail!(
                    "--query-timeout-seconds must be a number of seconds above 0, got {seconds}"
                ),
                None => defaults.query_limits.timeout,
            },
            max_rows: match args.query_max_rows.or(file.query_max_rows) {
                Some(0) => anyhow::bail!("--query-max-rows must be at least 1"),
                Some(rows) => rows,
                None => defaults.query_limits.max_rows,
            },
        },
        max_concurrent_queries: match args.max_concurrent_queries.or(file.max_concurrent_queries) {
            Some(0) => anyhow::bail!("--max-concurrent-queries must be at least 1"),
            Some(n) => n,
            None => defaults.max_concurrent_queries,
        },
        max_connections: match args.max_connections.or(file.max_connections) {
            Some(0) => anyhow::bail!("--max-connections must be at least 1"),
            Some(n) => n,
            None => defaults.max_connections,
        },
        header_timeout: match args.header_timeout_seconds.or(file.header_timeout_seconds) {
            Some(0) => anyhow::bail!("--header-timeout-seconds must be at least 1"),
            Some(seconds) => std::time::Duration::from_secs(seconds),
            None => defaults.header_timeout,
        },
        trusted_proxies: match args.trusted_proxies.or(file.trusted_proxies.clone()) {
            Some(networks) => parse_networks("--trusted-proxies", &networks)?,
            None => defaults.trusted_proxies,
        },
        metrics_allow: match args.metrics_allow.or(file.metrics_allow.clone()) {
            Some(networks) => parse_networks("--metrics-allow", &networks)?,
            None => defaults.metrics_allow,
        },
        shutdown_delay: args
            .shutdown_delay_seconds
            .or(file.shutdown_delay_seconds)
            .map_or(defaults.shutdown_delay, std::time::Duration::from_secs),
        quotas: default_quotas(&file, &args.quotas)?,
        retention_period: defaults.retention_period,
        api_requests_per_second: match args
            .api_requests_per_second
            .or(file.api_requests_per_second)
        {
            Some(0) => anyhow::bail!("--api-requests-per-second must be at least 1"),
            Some(n) => n,
            None => defaults.api_requests_per_second,
        },
        policy: file.plugins.clone().unwrap_or(defaults.policy),
        secret_key: args.key.source(&args.store, &file),
        store: args.store.config(&file),
    };
    tokio_runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|err| anyhow::anyhow!("failed to listen on {listen}: {err}"))?;
        let addr = listener.local_addr()?;
        match format {
            LogFormat::Text => eprintln!("sluice listening on http://{addr}"),
            LogFormat::Json => {
                tracing::info!(target: LISTENING_TARGET, %addr, "sluice listening on http://{addr}")
            }
        }
        crate::server::serve(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Parses `--trusted-proxies` or `--metrics-allow` (`flag`): addresses
/// (`10.0.0.7`) or networks (`10.0.0.0/8`).
fn parse_networks(flag: &str, networks: &[String]) -> anyhow::Result<Vec<ipnet::IpNet>> {
    networks
        .iter()
        .map(|text| text.trim())
        .filter(|text| !text.is_empty())
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{flag}: `{text}` is not an IP address or network such as 10.0.0.7 or 10.0.0.0/8"
                    )
                })
        })
        .collect()
}

/// The config file's `[quotas]` with the command line's `--quota`s on top.
fn default_quotas(file: &FileConfig, assignments: &[String]) -> anyhow::Result<Quotas> {
    let base = file.quotas.clone().unwrap_or_default();
    let mut overrides = serde_json::Map::new();
    for text in assignments {
        let (name, value) =
            Quotas::parse_assignment(text).map_err(|err| anyhow::anyhow!("--quota: {err}"))?;
        overrides.insert(name, value);
    }
    base.with_overrides(&overrides)
        .map_err(|err| anyhow::anyhow!("--quota: {err}"))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// The commands `admin` carries out.
enum TenancyCommand {
    Org(OrgCommand),
    Key(KeyCommand),
    Token(TokenCommand),
}

fn tenancy(command: TenancyCommand) -> anyhow::Result<ExitCode> {
    let file = FileConfig::default();
    tokio_runtime()?.block_on(async move {
        match command {
            TenancyCommand::Org(OrgCommand::Create { name, store }) => {
                admin::create_organisation(&store.config(&file), &name).await
            }
            TenancyCommand::Org(OrgCommand::List { store }) => {
                admin::list_organisations(&store.config(&file)).await
            }
            TenancyCommand::Key(KeyCommand::Create {
                organisation,
                name,
                scope,
                projects,
                store,
            }) => {
                admin::create_key(&store.config(&file), &organisation, &name, &scope, projects)
                    .await
            }
            TenancyCommand::Key(KeyCommand::List {
                organisation,
                store,
            }) => admin::list_keys(&store.config(&file), &organisation).await,
            TenancyCommand::Key(KeyCommand::Revoke { key_id, store }) => {
                admin::revoke_key(&store.config(&file), &key_id).await
            }
            TenancyCommand::Token(TokenCommand::Rotate {
                project,
                grace_seconds,
                store,
            }) => admin::rotate_token(&store.config(&file), &project, grace_seconds).await,
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn project(command: ProjectCommand) -> anyhow::Result<ExitCode> {
    match command {
        ProjectCommand::List {
            organisation,
            store,
        } => tokio_runtime()?
            .block_on(admin::list_projects(
                &store.config(&FileConfig::default()),
                organisation,
            ))
            .map(|()| ExitCode::SUCCESS),
        ProjectCommand::Create {
            name,
            organisation,
            timezone,
            store,
        } => tokio_runtime()?.block_on(async move {
            if name.trim().is_empty() {
                anyhow::bail!("--name must not be empty");
            }
            let Some(tz) = crate::query::spec::parse_tz(&timezone) else {
                anyhow::bail!(
                    "--timezone must be an IANA time zone such as Europe/Berlin or UTC, got {timezone}"
                );
            };
            let store = open_store(&store.config(&FileConfig::default())).await?;
            let created = store
                .create_project_with(organisation.as_deref(), name.trim(), tz.name(), true)
                .await?;
            let Some(created) = created else {
                store.close().await;
                anyhow::bail!(
                    "there is no organisation {}; `sluice org list` prints the ids",
                    organisation.unwrap_or_default()
                );
            };
            store
                .record_audit(&crate::store::NewAuditEntry {
                    organisation_id: created.organisation_id.clone(),
                    project_id: Some(created.project_id.clone()),
                    actor: "cli".into(),
                    action: "project create".into(),
                    target: Some(created.project_id.clone()),
                    status: 0,
                })
                .await?;
            store.close().await;
            println!("{}", serde_json::to_string(&created)?);
            Ok(ExitCode::SUCCESS)
        }),
        ProjectCommand::Quotas {
            project_id,
            set,
            unset,
            config,
            store,
        } => tokio_runtime()?.block_on(async move {
            let file = FileConfig::read(config.as_deref())?;
            let defaults = default_quotas(&file, &[])?;
            let store = open_store(&store.config(&file)).await?;
            let result = project_quotas(&store, &defaults, &project_id, &set, &unset).await;
            store.close().await;
            println!("{}", serde_json::to_string_pretty(&result?)?);
            Ok(ExitCode::SUCCESS)
        }),
    }
}

/// Applies `--set` and `--unset` to a project's stored overrides and
/// returns what `sluice project quotas` prints.
async fn project_quotas(
    store: &crate::store::Store,
    defaults: &Quotas,
    project_id: &str,
    set: &[String],
    unset: &[String],
) -> anyhow::Result<serde_json::Value> {
    let Some(stored) = store.project_quota_overrides(project_id).await? else {
        anyhow::bail!("there is no project {project_id}; `sluice project create` prints the ids");
    };
    let mut overrides: serde_json::Map<String, serde_json::Value> = match &stored {
        // Unreadable overrides are replaced by what is set now.
        Some(text) => serde_json::from_str(text).unwrap_or_default(),
        None => serde_json::Map::new(),
    };
    for name in unset {
        if !Quotas::names().contains(name) {
            anyhow::bail!(
                "--unset: there is no quota named `{name}`; the quotas are: {}",
                Quotas::names().join(", ")
            );
        }
        overrides.remove(name);
    }
    for text in set {
        let (name, value) =
            Quotas::parse_assignment(text).map_err(|err| anyhow::anyhow!("--set: {err}"))?;
        overrides.insert(name, value);
    }
    let quotas = defaults
        .with_overrides(&overrides)
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    if !set.is_empty() || !unset.is_empty() {
        let text = (!overrides.is_empty())
            .then(|| serde_json::Value::Object(overrides.clone()).to_string());
        store
            .set_project_quota_overrides(project_id, text.as_deref())
            .await?;
        if let Some(organisation) = store.project_organisation(project_id).await? {
            store
                .record_audit(&crate::store::NewAuditEntry {
                    organisation_id: organisation,
                    project_id: Some(project_id.to_string()),
                    actor: "cli".into(),
                    action: "project quotas".into(),
                    target: Some(project_id.to_string()),
                    status: 0,
                })
                .await?;
        }
    }
    Ok(serde_json::json!({
        "project_id": project_id,
        "overrides": overrides,
        "quotas": quotas,
    }))
}

fn secrets(command: SecretsCommand) -> anyhow::Result<ExitCode> {
    match command {
        SecretsCommand::NewKey => {
            let (_, text) = crate::store::Keyring::generate();
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        SecretsCommand::Rotate { config, store, key } => tokio_runtime()?.block_on(async move {
            let file = FileConfig::read(config.as_deref())?;
            let source = key.source(&store, &file);
            let store = open_store(&store.config(&file)).await?;
            let rotated = store.rotate_secrets(&source).await;
            store.close().await;
            println!("{}", serde_json::to_string(&rotated?)?);
            Ok(ExitCode::SUCCESS)
        }),
        SecretsCommand::Forget {
            key_id,
            config,
            store,
        } => tokio_runtime()?.block_on(async move {
            let file = FileConfig::read(config.as_deref())?;
            let store = open_store(&store.config(&file)).await?;
            let dropped = store.forget_secret_key(&key_id).await;
            store.close().await;
            let dropped: Vec<serde_json::Value> = dropped?
                .into_iter()
                .map(|(id, field)| serde_json::json!({"plugin_config_id": id, "field": field}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"key_id": key_id, "dropped": dropped})
            );
            Ok(ExitCode::SUCCESS)
        }),
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
