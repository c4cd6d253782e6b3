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

ALTER TABLE api_keys ADD COLUMN organisation_id TEXT REFERENCES organisations (id);
ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT 'created with the project';
-- The key's first characters, so that a list can tell keys apart without
-- showing them.
ALTER TABLE api_keys ADD COLUMN key_prefix TEXT NOT NULL DEFAULT 'phx_';
-- A JSON array of project ids the key is limited to; NULL for every
-- project of its organisation.
ALTER TABLE api_keys ADD COLUMN projects TEXT;
-- The key that created it, or 'cli'.
ALTER TABLE api_keys ADD COLUMN created_by TEXT NOT NULL DEFAULT 'cli';
ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE api_keys ADD COLUMN revoked_at TEXT;
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scope_check;
-- The key `sluice project create` printed was the project's own: it stays
-- an admin key of that project alone.
UPDATE api_keys SET organisation_id = 'org-' || project_id,
                    scope = 'admin',
                    projects = '["' || project_id || '"]';
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scope_check CHECK (scope IN ('read', 'write', 'admin'));
ALTER TABLE api_keys ALTER COLUMN organisation_id SET NOT NULL;
ALTER TABLE api_keys ALTER COLUMN name DROP DEFAULT;
ALTER TABLE api_keys ALTER COLUMN key_prefix DROP DEFAULT;
ALTER TABLE api_keys ALTER COLUMN created_by DROP DEFAULT;
ALTER TABLE api_keys DROP COLUMN project_id;
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
    id              BIGSERIAL PRIMARY KEY,
    organisation_id TEXT NOT NULL,
    project_id      TEXT,
    actor           TEXT NOT NULL,
    action          TEXT NOT NULL,
    target          TEXT,
    status          BIGINT NOT NULL,
    at              TEXT NOT NULL
);
CREATE INDEX audit_log_by_organisation ON audit_log (organisation_id, id);
