-- The IANA time zone that analytics queries of a project bucket days,
-- weeks and months in, unless a query names its own.
ALTER TABLE projects ADD COLUMN timezone TEXT NOT NULL DEFAULT 'UTC';
