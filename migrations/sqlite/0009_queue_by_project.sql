-- The worker claims each project's slice of the queue, so that one
-- project's backlog does not delay another's events (see
-- `Store::claim_in`), and capture counts each project's queued events.
CREATE INDEX capture_queue_by_project ON capture_queue (project_id, id);
