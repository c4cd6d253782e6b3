-- Projects, keys, the capture queue and stored events.

CREATE TABLE projects (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    capture_token TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects (id),
    -- sha256 of the key: keys are random and long, so a slow hash adds nothing.
    key_hash   TEXT NOT NULL UNIQUE,
    scope      TEXT NOT NULL CHECK (scope IN ('read', 'write')),
    created_at TEXT NOT NULL
);

-- Accepted events waiting for the pipeline. A row is written before capture
-- answers 200 and deleted only in the transaction that stores its events.
CREATE TABLE capture_queue (
    id          BIGSERIAL PRIMARY KEY,
    project_id  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    enqueued_at TEXT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT,
    attempts    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX capture_queue_ready ON capture_queue (lease_until, id);

CREATE TABLE events (
    project_id  TEXT NOT NULL,
    uuid        TEXT NOT NULL,
    event       TEXT NOT NULL,
    distinct_id TEXT NOT NULL,
    timestamp   TEXT NOT NULL,
    received_at TEXT NOT NULL,
    properties  TEXT NOT NULL,
    PRIMARY KEY (project_id, uuid)
);
CREATE INDEX events_by_time ON events (project_id, timestamp DESC);
CREATE INDEX events_by_name ON events (project_id, event, timestamp DESC);
CREATE INDEX events_by_distinct_id ON events (project_id, distinct_id, timestamp DESC);
