//! What can go wrong in the store, sorted by what the caller should do
//! about it. Callers decide by kind, never by matching a database's
//! message or code: a transient error is retried or waited out, and never
//! held against a plugin or a customer's data.

/// An error of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached, was shutting down, or gave up
    /// on the statement to let another through (busy, locked, a
    /// serialisation failure or deadlock): the same call may well work
    /// later.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A statement ran past its time budget and the database cancelled it.
    #[error("the database cancelled a statement that ran past its time limit")]
    Timeout(#[source] sqlx::Error),
    /// Stored data does not read back as what was written.
    #[error("{0}")]
    Corrupt(String),
    /// A secret config value could not be sealed or opened.
    #[error(transparent)]
    Secret(#[from] super::SecretError),
    /// Anything else: a statement the schema does not fit, a constraint.
    #[error(transparent)]
    Database(sqlx::Error),
}

impl Error {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Timeout(_))
    }
}

/// PostgreSQL's SQLSTATEs of a cancelled statement, and of conditions that
/// pass: connection trouble (class 08), shutdowns, too many connections,
/// serialisation failures and deadlocks.
const PG_CANCELED: &str = "57014";
const PG_TRANSIENT: [&str; 6] = ["57P01", "57P02", "57P03", "53300", "40001", "40P01"];

/// SQLite's primary result codes (the low byte of an extended code) of
/// conditions that pass: busy, locked, I/O, a full disk, a file it could
/// not open.
const SQLITE_TRANSIENT: [u32; 5] = [5, 6, 10, 13, 14];

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Error::Unavailable(err),
            sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => {
                Error::Corrupt(err.to_string())
            }
            sqlx::Error::Database(db) => {
                let code = db.code().map(|code| code.to_string()).unwrap_or_default();
                // PostgreSQL's codes are five characters, SQLite's numbers.
                let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
                let passes = if sqlite {
                    code.parse::<u32>()
                        .is_ok_and(|n| SQLITE_TRANSIENT.contains(&(n & 0xff)))
                } else {
                    code.starts_with("08") || PG_TRANSIENT.contains(&code.as_str())
                };
                if code == PG_CANCELED && !sqlite {
                    Error::Timeout(err)
                } else if passes {
                    Error::Unavailable(err)
                } else {
                    Error::Database(err)
                }
            }
            _ => Error::Database(err),
        }
    }
}
