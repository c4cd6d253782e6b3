-- Installed plugins and their per-project configs, plugin logs, and dead
-- letters of events that a fail-closed plugin could not transform.

CREATE TABLE plugins (
    sha256     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    version    TEXT NOT NULL,
    manifest   TEXT NOT NULL,
    wasm       BYTEA NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE plugin_configs (
    id                   TEXT PRIMARY KEY,
    project_id           TEXT NOT NULL REFERENCES projects (id),
    plugin_sha256        TEXT NOT NULL REFERENCES plugins (sha256),
    config               TEXT NOT NULL,
    enabled              BIGINT NOT NULL,
    position             BIGINT NOT NULL,
    failure_policy       TEXT NOT NULL CHECK (failure_policy IN ('open', 'closed')),
    consecutive_failures BIGINT NOT NULL DEFAULT 0,
    disabled_reason      TEXT,
    updated_at           TEXT NOT NULL
);
CREATE INDEX plugin_configs_by_project ON plugin_configs (project_id, position);

CREATE TABLE plugin_logs (
    id               BIGSERIAL PRIMARY KEY,
    plugin_config_id TEXT NOT NULL,
    at               TEXT NOT NULL,
    level            TEXT NOT NULL,
    message          TEXT NOT NULL,
    event_uuid       TEXT
);
CREATE INDEX plugin_logs_by_config ON plugin_logs (plugin_config_id, id);

CREATE TABLE dead_letters (
    id               BIGSERIAL PRIMARY KEY,
    project_id       TEXT NOT NULL,
    plugin_config_id TEXT NOT NULL,
    event            TEXT NOT NULL,
    error            TEXT NOT NULL,
    created_at       TEXT NOT NULL
);
CREATE INDEX dead_letters_by_project ON dead_letters (project_id, id);
