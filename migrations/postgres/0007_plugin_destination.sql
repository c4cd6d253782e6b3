-- Whether a plugin exports events (a destination), kept beside its manifest
-- so that the transaction storing events routes them to outboxes without
-- reading manifests.
ALTER TABLE plugins ADD COLUMN destination BIGINT NOT NULL DEFAULT 0;
UPDATE plugins SET destination = 1 WHERE (manifest::jsonb -> 'hooks') ? 'export';
