//! Shared by the integration tests: built plugins, runtimes and local HTTP
//! servers.

#![allow(dead_code)]

pub mod postgres;
pub mod process;
pub mod proxy;
pub mod python;
pub mod server;

/// Declares a test module per backend, each running every named
/// `async fn NAME(backend)` of the calling module once: the pair of tests
/// that every behaviour promised on both stores needs.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                super::$name(super::Backend::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                super::$name(super::Backend::Postgres).await
            })*
        }
    };
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Value, json};
use sluice::author::build::{BuildOptions, build};
use sluice::runtime::{Install, PluginEvent, Policy, Runtime, RuntimeConfig};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ has a parent")
        .to_path_buf()
}

/// Where `scripts/test.sh` puts the built plugins.
pub fn plugins_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("plugins")
}

/// Every plugin crate of the repository: first-party and test plugins.
pub fn plugin_crates() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut crates = Vec::new();
    for parent in ["plugins", "tests/plugins"] {
        for entry in std::fs::read_dir(root.join(parent)).expect("plugin folder exists") {
            let path = entry.expect("readable entry").path();
            if path.join("plugin.toml").exists() {
                crates.push(path);
            }
        }
    }
    crates.sort();
    crates
}

/// Builds the plugins if any `.wasm` is missing. `scripts/test.sh` builds
/// them before the tests, so this only matters for a bare `cargo test`; a
/// file lock keeps parallel test processes from building at once.
fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = plugins_dir();
        let missing = |dir: &Path| {
            plugin_crates().iter().any(|krate| {
                let name = krate.file_name().unwrap().to_string_lossy().to_string();
                !dir.join(format!("{name}.wasm")).exists()
            })
        };
        if !missing(&dir) {
            return;
        }
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::File::create(dir.join(".build.lock")).unwrap();
        lock.lock().unwrap();
        if missing(&dir) {
            build(&BuildOptions {
                paths: plugin_crates(),
                out_dir: Some(dir.clone()),
                toolchain: None,
            })
            .expect("building the plugins failed; run scripts/test.sh to see why");
        }
    });
}

/// The bytes of a built plugin from `plugins/` or `tests/plugins/`.
pub fn wasm(name: &str) -> Vec<u8> {
    ensure_built();
    let path = plugins_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|err| panic!("failed to read {}: {err}", path.display()))
}

pub fn wasm_path(name: &str) -> PathBuf {
    ensure_built();
    plugins_dir().join(format!("{name}.wasm"))
}

/// A runtime with the shared on-disk cache, as the server has.
pub fn runtime(policy: Policy) -> Runtime {
    Runtime::new(RuntimeConfig {
        policy,
        pool_size: 10,
        ..RuntimeConfig::default()
    })
    .expect("runtime starts")
}

/// The project of [`install`]'s installs.
pub const PROJECT: &str = "test-project";

pub fn install(install_id: &str, config: Value) -> Install {
    Install {
        install_id: install_id.into(),
        project_id: PROJECT.into(),
        config,
        limits: None,
    }
}

pub fn event(name: &str, properties: Value) -> PluginEvent {
    PluginEvent {
        uuid: "01890000-0000-7000-8000-000000000001".into(),
        name: name.into(),
        distinct_id: "user-1".into(),
        timestamp: "2024-05-01T12:00:00.000Z".into(),
        properties: match properties {
            Value::Object(map) => map,
            _ => json!({}).as_object().unwrap().clone(),
        },
    }
}

/// Serves `router` on an ephemeral loopback port from a thread of its own,
/// for as long as the test process lives.
pub fn serve(router: axum::Router) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// The message of a permanent export failure of `plugin` (`name@version`);
/// anything else fails the test.
pub fn permanent(plugin: &str, result: Result<(), sluice::runtime::ExportFailure>) -> String {
    match result {
        Err(sluice::runtime::ExportFailure::Permanent {
            plugin: failed,
            message,
        }) => {
            assert_eq!(failed, plugin);
            message
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

/// The message and retry-after of a retryable export failure; anything else
/// fails the test.
pub fn retryable(
    result: Result<(), sluice::runtime::ExportFailure>,
) -> (String, Option<std::time::Duration>) {
    match result {
        Err(sluice::runtime::ExportFailure::Retryable {
            message,
            retry_after,
            ..
        }) => (message, retry_after),
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

/// What a webhook receiver was sent: every event's uuid, with how often
/// (the webhook destination posts a JSON array of records with `uuid`).
#[derive(Clone, Default)]
pub struct Received(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl Received {
    /// Counts the records of one webhook request body.
    pub fn record(&self, body: &[u8]) {
        let records: Vec<Value> = serde_json::from_slice(body).expect("a JSON array of records");
        let mut seen = self.0.lock().unwrap();
        for record in records {
            let uuid = record["uuid"].as_str().expect("a record has a uuid");
            *seen.entry(uuid.to_string()).or_default() += 1;
        }
    }

    /// Every uuid received at least once.
    pub fn uuids(&self) -> std::collections::HashSet<String> {
        self.0.lock().unwrap().keys().cloned().collect()
    }

    /// Deliveries beyond the first of each uuid.
    pub fn duplicates(&self) -> usize {
        self.0.lock().unwrap().values().map(|n| n - 1).sum()
    }

    /// Whether every uuid was received exactly once.
    pub fn each_once(&self) -> bool {
        self.0.lock().unwrap().values().all(|n| *n == 1)
    }

    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// A webhook receiver on loopback that answers 200 to every batch at
/// `/hook`; its URL and what it received.
pub fn webhook_receiver() -> (String, Received) {
    let received = Received::default();
    let counted = received.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counted = counted.clone();
            async move {
                counted.record(&body);
                "ok"
            }
        }),
    );
    (format!("http://{}/hook", serve(router)), received)
}
