-- Per-project overrides of the operator's default quotas, as a JSON object
-- of quota names to numbers; NULL keeps every default.
ALTER TABLE projects ADD COLUMN quotas TEXT;
