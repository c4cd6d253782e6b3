-- Delivery to destinations: a durable outbox per destination install, the
-- attempts made, running totals, dead letters that can be replayed, and
-- claimed runs of scheduled tasks.

-- Batch size, linger, retry window, concurrency, rate limit and event
-- filter of a destination install, as JSON; empty means the defaults.
ALTER TABLE plugin_configs ADD COLUMN delivery TEXT NOT NULL DEFAULT '{}';
-- Set while deliveries are paused (by the API or after repeated failure);
-- events keep arriving in the outbox meanwhile.
ALTER TABLE plugin_configs ADD COLUMN paused_reason TEXT;

-- One row per (event, destination) not yet delivered or dead-lettered. It
-- is written in the transaction that stores the event and deleted in the one
-- that records the delivery, so every event is delivered or dead-lettered.
CREATE TABLE outbox (
    id               BIGSERIAL PRIMARY KEY,
    project_id       TEXT NOT NULL,
    plugin_config_id TEXT NOT NULL,
    event_uuid       TEXT NOT NULL,
    payload          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL DEFAULT 0,
    first_failed_at  BIGINT,
    last_error       TEXT,
    lease_owner      TEXT,
    lease_until      BIGINT
);
CREATE INDEX outbox_by_destination ON outbox (plugin_config_id, id);

CREATE TABLE delivery_attempts (
    id               BIGSERIAL PRIMARY KEY,
    plugin_config_id TEXT NOT NULL,
    at               TEXT NOT NULL,
    events           BIGINT NOT NULL,
    outcome          TEXT NOT NULL,
    status_code      BIGINT,
    latency_ms       BIGINT NOT NULL,
    error            TEXT
);
CREATE INDEX delivery_attempts_by_destination ON delivery_attempts (plugin_config_id, id);

CREATE TABLE destination_stats (
    plugin_config_id     TEXT PRIMARY KEY,
    delivered            BIGINT NOT NULL DEFAULT 0,
    dead_lettered        BIGINT NOT NULL DEFAULT 0,
    failed_attempts      BIGINT NOT NULL DEFAULT 0,
    consecutive_failures BIGINT NOT NULL DEFAULT 0,
    -- Batches dead-lettered in a row; enough of them pause the destination.
    dead_batches_in_row  BIGINT NOT NULL DEFAULT 0,
    last_error           TEXT,
    last_error_at        TEXT,
    last_delivered_at    TEXT
);

-- Where a dead letter came from: a fail-closed transformation ('transform')
-- or a destination ('delivery'); replay sends it back there.
ALTER TABLE dead_letters ADD COLUMN stage TEXT NOT NULL DEFAULT 'transform';
ALTER TABLE dead_letters ADD COLUMN event_uuid TEXT;
CREATE INDEX dead_letters_by_config ON dead_letters (plugin_config_id, id);

-- A scheduled task's run for one fire time, claimed by the first process to
-- insert it, so each fire runs once however many processes share the store.
CREATE TABLE scheduled_runs (
    plugin_config_id TEXT NOT NULL,
    task             TEXT NOT NULL,
    fire_at          TEXT NOT NULL,
    owner            TEXT NOT NULL,
    PRIMARY KEY (plugin_config_id, task, fire_at)
);
