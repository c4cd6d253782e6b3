-- Organisations own projects; personal API keys belong to an organisation,
-- with a scope and optionally a list of the projects they may touch; a
-- capture token can be rotated with the old one kept for a grace period;
-- every management write is recorded.

CREATE TABLE organisations (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- Each existing project becomes the one project of its own organisation,
-- so that no key reaches further than it did.
INSERT INTO organisations (id, name, created_at)
    SELECT 'org-' || id, name, created_at FROM projects;
ALTER TABLE projects ADD COLUMN organisation_id TEXT REFERENCES organisations (id);
UPDATE projects SET organisation_id = 'org-' || id;
CREATE INDEX projects_by_organisation ON projects (organisation_id, id);

-- SQLite cannot change a CHECK constraint or drop a referencing column, so
-- the key table is rebuilt.
ALTER TABLE api_keys RENAME TO api_keys_before_0012;
CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    organisation_id TEXT NOT NULL REFERENCES organisations (id),
    name            TEXT NOT NULL,
    -- sha256 of the key: keys are random and long, so a slow hash adds nothing.
    key_hash        TEXT NOT NULL UNIQUE,
    -- The key's first characters, so that a list can tell keys apart
    -- without showing them.
    key_prefix      TEXT NOT NULL,
    scope           TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    -- A JSON array of project ids the key is limited to; NULL for every
    -- project of its organisation.
    projects        TEXT,
    -- The key that created it, or 'cli'.
    created_by      TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    last_used_at    TEXT,
    revoked_at      TEXT
);
-- The key `sluice project create` printed was the project's own: it stays
-- an admin key of that project alone.
INSERT INTO api_keys (id, organisation_id, name, key_hash, key_prefix, scope, projects, created_by, created_at)
    SELECT k.id, 'org-' || k.project_id, 'created with the project', k.key_hash, 'phx_',
           'admin', '["' || k.project_id || '"]', 'cli', k.created_at
    FROM api_keys_before_0012 k;
DROP TABLE api_keys_before_0012;
CREATE INDEX api_keys_by_organisation ON api_keys (organisation_id, id);

-- Capture tokens replaced by a rotation, still accepted until `valid_until`.
CREATE TABLE retired_capture_tokens (
    token       TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL REFERENCES projects (id),
    retired_at  TEXT NOT NULL,
    valid_until TEXT NOT NULL
);
CREATE INDEX retired_capture_tokens_by_project ON retired_capture_tokens (project_id);

-- Every management write: who (a key id, or 'cli'), what, and when.
CREATE TABLE audit_log (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    organisation_id TEXT NOT NULL,
    project_id      TEXT,
    actor           TEXT NOT NULL,
    action          TEXT NOT NULL,
    target          TEXT,
    status          INTEGER NOT NULL,
    at              TEXT NOT NULL
);
CREATE INDEX audit_log_by_organisation ON audit_log (organisation_id, id);
