-- Whether a plugin exports events (a destination), kept beside its manifest
-- so that the transaction storing events routes them to outboxes without
-- reading manifests.
ALTER TABLE plugins ADD COLUMN destination INTEGER NOT NULL DEFAULT 0;
UPDATE plugins SET destination = 1
WHERE EXISTS (SELECT 1 FROM json_each(manifest, '$.hooks') WHERE value = 'export');
