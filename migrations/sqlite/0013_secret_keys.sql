-- The ids of the server keys this database's secret config values are
-- sealed with, so that servers sharing the database agree on one key: a
-- server that does not hold every key listed here refuses to start rather
-- than seal with a key of its own that the others cannot open.
CREATE TABLE secret_keys (
    key_id   TEXT PRIMARY KEY,
    added_at TEXT NOT NULL
);
