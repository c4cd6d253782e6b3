//! How statements are spelled for both backends: the placeholders of
//! multi-row statements and batch lookups, inlined id lists, and the one
//! statement that gives leases back. The table files build their SQL
//! from these, so the tricks that keep large batches cheap (anonymous
//! `?` on SQLite, `VALUES` joins on PostgreSQL) live in one place.

use sqlx::AnyPool;

use super::{Backend, Result};

/// Values per multi-row insert: well under both backends' bind limits.
pub(super) const ROWS_PER_INSERT: usize = 100;

/// The placeholder of bind parameter `n` (counting from 1). PostgreSQL
/// numbers them (`$n`). SQLite gets plain `?`, bound in the order they
/// appear: it looks a named or numbered parameter up in a list on every
/// parse and every bind, which made a statement of a few thousand
/// parameters cost time quadratic in their number (a seventh of the
/// storage path's time in the load benchmark). A statement built with
/// these helpers must therefore use them for every parameter, in order.
pub(super) fn placeholder(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Sqlite => "?".into(),
        Backend::Postgres => format!("${n}"),
    }
}

/// `($1, $2, $3), ($4, $5, $6), …` from parameter `first` on: the
/// placeholders of a multi-row `VALUES` list. On PostgreSQL each
/// statement is a round trip, so rows go in together.
pub(super) fn values_placeholders(
    backend: Backend,
    first: usize,
    rows: usize,
    columns: usize,
) -> String {
    (0..rows)
        .map(|row| {
            let cells: Vec<String> = (0..columns)
                .map(|column| placeholder(backend, first + row * columns + column))
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first, $first+1, …`: the placeholders of an `IN (…)` list.
pub(super) fn list_placeholders(backend: Backend, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| placeholder(backend, n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SELECT columns FROM table WHERE project_id = ? AND key IN (…)`, with
/// `count` keys bound after the project: how a batch looks up its rows.
/// On PostgreSQL the keys are a `VALUES` list joined to the table, which
/// the planner probes the primary key with, one key at a time, even on a
/// table it has no statistics for; an `IN` list there was planned as a
/// scan of the whole project, every row compared with every key (100 ms
/// per batch at 100,000 events). Columns are named on the table `t`.
pub(super) fn keyed_lookup(
    backend: Backend,
    columns: &str,
    table: &str,
    key: &str,
    count: usize,
) -> String {
    match backend {
        Backend::Sqlite => format!(
            "SELECT {columns} FROM {table} t WHERE t.project_id = ? AND t.{key} IN ({})",
            list_placeholders(backend, 2, count)
        ),
        Backend::Postgres => format!(
            "SELECT {columns} FROM {table} t JOIN (VALUES {}) v (key) ON t.{key} = v.key WHERE t.project_id = $1",
            values_placeholders(backend, 2, count, 1)
        ),
    }
}

/// A comma-separated list of ids, inlined: they are integers, and one
/// statement per batch is one round trip on PostgreSQL.
pub(super) fn id_list(ids: impl IntoIterator<Item = i64>) -> String {
    ids.into_iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Gives back the leases `owner` holds on the rows of `table` (a queue
/// with `lease_owner` and `lease_until` columns), so the rows can be
/// claimed again at once instead of when the lease runs out: all of them
/// with `None`, for a graceful stop, or only `ids`, after a batch failed.
///
/// On SQLite the capture queue keeps its leases in memory (see
/// `capture_queue::claim_in`), so there this matches no rows; it runs
/// anyway, as a statement on the pool, like every release.
pub(super) async fn release_leases(
    pool: &AnyPool,
    table: &str,
    owner: &str,
    ids: Option<&[i64]>,
) -> Result<()> {
    let release =
        format!("UPDATE {table} SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1");
    let Some(ids) = ids else {
        return sqlx::query(&release)
            .bind(owner)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(Into::into);
    };
    for chunk in ids.chunks(1_000) {
        let list = id_list(chunk.iter().copied());
        sqlx::query(&format!("{release} AND id IN ({list})"))
            .bind(owner)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// A stored value that does not read back as what was written: an error
/// naming the row and the column, never a silent default.
pub(super) fn corrupt(what: &str, id: &str, err: impl std::fmt::Display) -> super::Error {
    super::Error::Corrupt(format!("the stored {what} of {id} is corrupt: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_then_columns_on_postgres() {
        assert_eq!(
            values_placeholders(Backend::Postgres, 1, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(list_placeholders(Backend::Postgres, 2, 3), "$2, $3, $4");
    }

    #[test]
    fn lookups_join_a_values_list_on_postgres() {
        assert_eq!(
            keyed_lookup(Backend::Postgres, "t.uuid", "events", "uuid", 2),
            "SELECT t.uuid FROM events t JOIN (VALUES ($2), ($3)) v (key) ON t.uuid = v.key WHERE t.project_id = $1"
        );
        assert_eq!(
            keyed_lookup(Backend::Sqlite, "t.uuid", "events", "uuid", 2),
            "SELECT t.uuid FROM events t WHERE t.project_id = ? AND t.uuid IN (?, ?)"
        );
    }

    #[test]
    fn placeholders_are_anonymous_on_sqlite() {
        assert_eq!(
            values_placeholders(Backend::Sqlite, 1, 2, 2),
            "(?, ?), (?, ?)"
        );
        assert_eq!(list_placeholders(Backend::Sqlite, 2, 2), "?, ?");
    }
}
