-- Claims walk the queue by id from where the last claim ended (see
-- `Store::claim`), so the index on the lease is no longer read. Without
-- it, the UPDATE that leases a row changes no indexed column and can be a
-- heap-only update: one dead index entry per event (its deletion) instead
-- of two, and the free space a heap-only update needs is kept on each
-- page by the lower fill factor.
DROP INDEX capture_queue_ready;
ALTER TABLE capture_queue SET (fillfactor = 70);

-- Both queues delete every row they hold within seconds: vacuum them
-- after a few thousand dead rows rather than after a fifth of the table,
-- so index scans do not step over long runs of dead entries.
ALTER TABLE capture_queue SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE outbox SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_cost_delay = 0);
