//! A fresh PostgreSQL database per test, so tests on one server never see
//! each other's queue rows. `SLUICE_TEST_DATABASE_URL` names the server
//! (default: the local one, database `test`).

use sqlx::Connection;

pub fn admin_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let admin = admin_url();
        let name = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|err| {
                panic!("PostgreSQL at {admin} is needed for the PostgreSQL tests: {err}")
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let mut url = reqwest::Url::parse(&admin).unwrap();
        url.set_path(&name);
        TestDatabase {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; a thread of its own may block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A store of its own on either backend, for tests that talk to the store
/// without a server: a SQLite file in a temporary directory, or a fresh
/// PostgreSQL database, both gone when this is dropped.
pub struct TestStore {
    pub config: sluice::store::StoreConfig,
    _dir: tempfile::TempDir,
    _database: Option<TestDatabase>,
}

impl TestStore {
    pub async fn create(backend: sluice::store::Backend) -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let (config, database) = match backend {
            sluice::store::Backend::Sqlite => (
                sluice::store::StoreConfig::Sqlite {
                    data_dir: dir.path().to_path_buf(),
                },
                None,
            ),
            sluice::store::Backend::Postgres => {
                let database = TestDatabase::create().await;
                let url = database.url.clone();
                (sluice::store::StoreConfig::Postgres { url }, Some(database))
            }
        };
        TestStore {
            config,
            _dir: dir,
            _database: database,
        }
    }

    /// Opens the store, running its migrations.
    pub async fn open(&self) -> sluice::store::Store {
        sluice::server::open_store(&self.config).await.unwrap()
    }
}
