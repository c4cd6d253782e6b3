//! The SQL store behind both backends: SQLite (one file under the data dir,
//! WAL mode, `synchronous = FULL`, so a committed capture survives a crash
//! or power loss) and PostgreSQL (several processes on one database, queue
//! rows claimed with `FOR UPDATE SKIP LOCKED`). One set of queries serves
//! both through sqlx's `Any` driver; the few that differ say so.
//!
//! This file owns no table: it opens the pools, hands out write
//! transactions with this process's turn at the write lock, deletes in
//! bounded chunks for retention, and checkpoints the SQLite WAL. Each table's statements are in the file
//! named after it.
//!
//! Analytics reads (queries, the events list) have a pool of their own,
//! [`Store::open_with_readers`]: a year-long trend holds its connection
//! for seconds, and on the pool that capture's lookups, the worker's
//! claims and delivery share, a few of them at once left those waiting
//! for a connection.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use super::Result;

/// Where data lives.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// `DIR/sluice.db`, the embedded default.
    Sqlite { data_dir: PathBuf },
    /// A PostgreSQL database that several processes may share.
    Postgres { url: String },
}

/// Which database a store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    /// Analytics reads only: on SQLite, read-only connections to the same
    /// file (WAL lets them read while the writer writes); on PostgreSQL, a
    /// second small pool. See [`Store::open_with_readers`].
    pub(super) read: AnyPool,
    /// On SQLite, the one connection every write transaction of this
    /// process runs on; see [`Store::write`]. On PostgreSQL writes use
    /// `pool`.
    writer: Option<AnyPool>,
    backend: Backend,
    /// Turns at SQLite's one write lock; see [`Store::write`].
    writers: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The server key and what opened configs' secrets are; see
    /// `secrets`.
    pub(super) secrets: std::sync::Arc<super::secrets::Secrets>,
}

/// What a write transaction's commit must survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Commit {
    /// Power loss: the commit is on disk before it returns (SQLite fsyncs
    /// its WAL, PostgreSQL flushes its WAL). Anything that a client is told
    /// is stored, and anything that cannot be worked out again.
    Durable,
    /// A crash of this process, not power loss. For the pipeline's
    /// transactions only: each stores what it made of queue rows and
    /// deletes those rows atomically, so if power loss takes the commit,
    /// the rows are back in the queue and are stored again, once per
    /// (project, uuid). Both databases write one log in commit order, so
    /// the next durable commit (capture's next group) flushes it too, and
    /// a lost commit takes only later, equally redoable ones with it. This
    /// saves a flush of the log per batch, milliseconds on this machine's
    /// disk, most of them with SQLite's write lock held. Retention's
    /// deletions too: one that power loss takes is made again next round.
    Redoable,
}

/// SQLite settings for every connection: WAL so readers never block the
/// writer, FULL sync so an acknowledged write is on disk, and a busy timeout
/// because a second process (`sluice project create`) may hold the write
/// lock for a moment. Analytics queries read rows in time order, which is
/// not the order they were written in: memory-mapping the file and a 64 MiB
/// page cache spare them a read syscall per row, which halved query times
/// in the query benchmark.
const SQLITE_PRAGMAS: [&str; 6] = [
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA mmap_size = 1073741824",
    "PRAGMA cache_size = -65536",
];

/// The analytics readers' settings: those of [`SQLITE_PRAGMAS`] a
/// read-only connection may set. The file is in WAL mode already (the
/// writer opens first), and a reader commits nothing to sync.
const SQLITE_READER_PRAGMAS: [&str; 3] = [
    "PRAGMA busy_timeout = 10000",
    "PRAGMA mmap_size = 1073741824",
    "PRAGMA cache_size = -65536",
];

/// Analytics readers a store opens with [`Store::open`]: what a process
/// that runs no queries (the CLI) or the default server needs.
const DEFAULT_READERS: u32 = 5;

/// How long a read waits for a connection of the readers' pool before it
/// fails. The query API lets no more queries run than the pool has
/// connections, so only an events list behind many others waits at all.
const READER_ACQUIRE: Duration = Duration::from_secs(10);

/// The writer connection's settings: as above, without the memory map,
/// and with two more.
///
/// - The writer reads the pages it changes through its own page cache,
///   which stays warm because no other connection of the process writes
///   (SQLite empties a connection's cache whenever another connection has
///   committed since its last transaction); a map of a file that grows
///   with every batch was remapped over and over.
/// - Statement journals (the pages a multi-row statement changes, kept so
///   that the statement alone can be undone) stay in memory instead of a
///   temporary file: writing them was 8 % of the server's time in the load
///   benchmark.
/// - Checkpoints (copying pages from the WAL into the database) do not run
///   here: a checkpoint that ran in the commit that crossed the threshold
///   held the write lock for its whole copy, and capture's commits waited
///   behind it. [`Store::checkpoint`] does that copy on another connection
///   while writers go on. The threshold stays, far above what the
///   checkpointer lets the WAL reach, for processes that run none (the
///   CLI) and in case it falls behind.
const SQLITE_WRITER_PRAGMAS: [&str; 8] = [
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA mmap_size = 0",
    "PRAGMA cache_size = -65536",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA wal_autocheckpoint = 100000",
];

/// How often the SQLite WAL is copied into the database. Each round copies
/// every page changed since the last once, however often it changed, so
/// rounds much more frequent would copy the hot pages (the queue's, the
/// ends of time-ordered indexes) over and over; much rarer ones let the WAL
/// grow to hundreds of megabytes under load.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Passes a checkpoint makes beside the writers, at most, before the one
/// that holds the write lock; see [`Store::checkpoint`].
const CHECKPOINT_PASSES: usize = 4;

/// New WAL pages since the previous pass below which a checkpoint stops
/// passing beside the writers and takes the lock for the rest.
const CHECKPOINT_LOCKED_PAGES: i64 = 256;

/// Rows one pruning statement deletes at most, each in its own
/// transaction: on SQLite a transaction holds the one write lock, and
/// capture's commits wait behind it, so a backlog of millions is pruned in
/// many short turns rather than one long one.
pub const PRUNE_CHUNK: u64 = 10_000;

/// The upper bound of a pruning statement.
#[derive(Clone, Copy)]
pub(super) enum Bound<'a> {
    Text(&'a str),
    Id(i64),
}

/// A pool of connections to the SQLite file at `path`, each set up with
/// `pragmas` when it opens.
async fn sqlite_pool(
    options: AnyPoolOptions,
    url: &str,
    path: &Path,
    pragmas: &'static [&'static str],
) -> anyhow::Result<AnyPool> {
    options
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for pragma in pragmas {
                    sqlx::query(pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .map_err(|err| anyhow::anyhow!("failed to open {}: {err}", path.display()))
}

/// The analytics readers' pool on the SQLite file at `path`: read-only
/// connections, opened as reads need them.
fn sqlite_readers(options: AnyPoolOptions, path: &Path) -> anyhow::Result<AnyPool> {
    options
        .after_connect(|conn, _| {
            Box::pin(async move {
                for pragma in SQLITE_READER_PRAGMAS {
                    sqlx::query(pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect_lazy(&format!("sqlite://{}?mode=ro", path.display()))
        .map_err(|err| anyhow::anyhow!("failed to open {}: {err}", path.display()))
}

impl Store {
    /// Connects to the configured database and runs its migrations.
    pub async fn open(config: &StoreConfig) -> anyhow::Result<Store> {
        Self::open_with_readers(config, DEFAULT_READERS).await
    }

    /// [`Store::open`] with `readers` connections for analytics reads,
    /// opened when first needed. The server gives one per query it lets
    /// run at once, and one more so the events list does not wait behind
    /// them.
    pub async fn open_with_readers(config: &StoreConfig, readers: u32) -> anyhow::Result<Store> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let readers = AnyPoolOptions::new()
            .max_connections(readers.max(1))
            .acquire_timeout(READER_ACQUIRE);
        match config {
            StoreConfig::Sqlite { data_dir } => Self::open_sqlite(data_dir, readers).await,
            StoreConfig::Postgres { url } => Self::open_postgres(url, readers).await,
        }
    }

    async fn open_sqlite(data_dir: &Path, readers: AnyPoolOptions) -> anyhow::Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(|err| {
            anyhow::anyhow!(
                "failed to create the data dir {}: {err}",
                data_dir.display()
            )
        })?;
        let path = data_dir.join("sluice.db");
        let pool = sqlite_pool(
            AnyPoolOptions::new().max_connections(4),
            &format!("sqlite://{}?mode=rwc", path.display()),
            &path,
            &SQLITE_PRAGMAS,
        )
        .await?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|err| anyhow::anyhow!("failed to migrate {}: {err}", path.display()))?;
        let writer = sqlite_pool(
            AnyPoolOptions::new()
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None),
            &format!("sqlite://{}", path.display()),
            &path,
            &SQLITE_WRITER_PRAGMAS,
        )
        .await?;
        // Opened after the writer, so the file is in WAL mode and its
        // shared-memory index exists for read-only connections to use.
        let read = sqlite_readers(readers, &path)?;
        Ok(Store {
            pool,
            read,
            writer: Some(writer),
            backend: Backend::Sqlite,
            writers: Default::default(),
            secrets: Default::default(),
        })
    }

    async fn open_postgres(url: &str, readers: AnyPoolOptions) -> anyhow::Result<Store> {
        let shown = redact_url(url);
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|err| anyhow::anyhow!("failed to connect to {shown}: {err}"))?;
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(|err| anyhow::anyhow!("failed to migrate {shown}: {err}"))?;
        let read = readers
            .connect_lazy(url)
            .map_err(|err| anyhow::anyhow!("failed to connect to {shown}: {err}"))?;
        Ok(Store {
            pool,
            read,
            writer: None,
            backend: Backend::Postgres,
            writers: Default::default(),
            secrets: Default::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A write transaction, and on SQLite this process's turn to write,
    /// held until the caller drops it (after the commit).
    ///
    /// On SQLite the transaction takes the write lock at once: a deferred
    /// one that reads first cannot upgrade after another writer committed,
    /// and would fail with "database is locked". Writers of this process
    /// also queue for their turn here, in arrival order, rather than in
    /// SQLite's busy handler, which retries with sleeps of up to 100 ms:
    /// under load the worker, which starts its next transaction the moment
    /// it commits, won nearly every race for the lock, and capture's group
    /// commits waited hundreds of milliseconds.
    ///
    /// All of them run on one connection, which keeps its page cache from
    /// one transaction to the next: spread over the pool, each transaction
    /// found its cache emptied by the other connections' commits and read
    /// its pages again.
    pub(super) async fn write(
        &self,
    ) -> Result<(
        sqlx::Transaction<'static, sqlx::Any>,
        Option<tokio::sync::OwnedMutexGuard<()>>,
    )> {
        self.write_with(Commit::Durable).await
    }

    /// A write transaction whose commit survives what `commit` says.
    pub(super) async fn write_with(
        &self,
        commit: Commit,
    ) -> Result<(
        sqlx::Transaction<'static, sqlx::Any>,
        Option<tokio::sync::OwnedMutexGuard<()>>,
    )> {
        match self.backend {
            Backend::Sqlite => {
                let turn = self.writers.clone().lock_owned().await;
                let writer = self.writer.as_ref().unwrap_or(&self.pool);
                // Set on every transaction, in the statement that begins
                // it, so a durable one never runs with a setting left by
                // the one before.
                let begin = match commit {
                    Commit::Durable => "PRAGMA synchronous = FULL; BEGIN IMMEDIATE",
                    Commit::Redoable => "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE",
                };
                let tx = writer.begin_with(begin).await?;
                Ok((tx, Some(turn)))
            }
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                if commit == Commit::Redoable {
                    sqlx::query("SET LOCAL synchronous_commit = off")
                        .execute(&mut *tx)
                        .await?;
                }
                Ok((tx, None))
            }
        }
    }

    /// Runs `delete` (which deletes at most [`PRUNE_CHUNK`] rows of its
    /// key `$1` up to `$2`) until it deletes fewer, each time in a write
    /// transaction of its own.
    pub(super) async fn prune_in_chunks(
        &self,
        delete: &str,
        key: &str,
        bound: Bound<'_>,
    ) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let (mut tx, _turn) = self.write_with(Commit::Redoable).await?;
            let query = sqlx::query(delete).bind(key);
            let query = match bound {
                Bound::Text(text) => query.bind(text),
                Bound::Id(id) => query.bind(id),
            };
            let n = query.execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            deleted += n;
            if n < PRUNE_CHUNK {
                return Ok(deleted);
            }
        }
    }

    /// Copies the SQLite WAL into the database file, so the WAL can start
    /// over; a no-op on PostgreSQL. Returns the WAL's length in pages
    /// before the copy.
    ///
    /// Two steps. The first copies what the WAL holds without the write
    /// lock: SQLite lets a passive checkpoint run beside a writer, so the
    /// bulk of the copy costs writers nothing; it goes again while writers
    /// committed much meanwhile. The second, with this process's turn at
    /// the write lock, copies the few pages committed since. Only a WAL
    /// copied in full is started over by the next writer, and under steady
    /// load the first step alone never catches up, so without the second
    /// the file grows for as long as the load lasts. Neither step waits
    /// for readers; a long query holding an old snapshot only delays the
    /// restart to a later round.
    pub async fn checkpoint(&self) -> Result<i64> {
        if self.backend != Backend::Sqlite {
            return Ok(0);
        }
        let mut conn = self.pool.acquire().await?;
        // Each pass copies the WAL as it was when the pass began, so what
        // it leaves is what was committed while it ran; the next pass
        // copies that, and is shorter. Once a pass found little new, the
        // locked one has little left: a locked pass right after the first
        // held capture's commits for 15 to 20 ms at 5,000 events a second.
        let mut first = None;
        let mut previous = i64::MIN;
        for _ in 0..CHECKPOINT_PASSES {
            let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut *conn)
                .await?;
            // The WAL's length in pages when the pass began; it starts
            // over from 0 when a writer restarts it.
            let log: i64 = row.try_get(1)?;
            first.get_or_insert(log);
            if log <= previous.saturating_add(CHECKPOINT_LOCKED_PAGES) {
                break;
            }
            previous = log;
        }
        let pages = first.unwrap_or(0);
        let _turn = self.writers.clone().lock_owned().await;
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut *conn)
            .await?;
        Ok(pages)
    }

    /// Checkpoints the SQLite WAL every `CHECKPOINT_EVERY` until `stop`
    /// turns true; returns at once on PostgreSQL, which checkpoints itself.
    pub async fn run_checkpoints(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.backend != Backend::Sqlite {
            return;
        }
        let mut failing = false;
        while !*stop.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                _ = stop.changed() => break,
            }
            match self.checkpoint().await {
                Ok(_) => failing = false,
                // Once per run of failures: the writer's own threshold
                // still bounds the WAL meanwhile.
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(error = %err, "SQLite checkpoint failed; the WAL grows until it succeeds");
                }
                Err(_) => {}
            }
        }
    }

    /// Whether the database answers a trivial query: what `/_ready`
    /// asks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(Into::into)
    }

    pub async fn close(&self) {
        if let Some(writer) = &self.writer {
            writer.close().await;
        }
        self.read.close().await;
        self.pool.close().await;
    }
}

/// The URL without its password, for error messages.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "the database URL".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_readers_see_committed_writes_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_readers(
            &StoreConfig::Sqlite {
                data_dir: dir.path().into(),
            },
            2,
        )
        .await
        .unwrap();
        let project = store.create_project("p").await.unwrap().project_id;
        let name: String = sqlx::query_scalar("SELECT name FROM projects WHERE id = $1")
            .bind(&project)
            .fetch_one(&store.read)
            .await
            .unwrap();
        assert_eq!(name, "p");
        let refused = sqlx::query("UPDATE projects SET name = 'q'")
            .execute(&store.read)
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("readonly"), "{refused}");
        store.close().await;
    }
}
