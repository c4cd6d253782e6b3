-- Which project uploaded which plugin file, so that each project's uploads
-- count against its own `plugins` and `plugin_bytes` quotas: the files are
-- stored once, whoever uploads them.
CREATE TABLE plugin_uploads (
    project_id TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (project_id, sha256)
);
