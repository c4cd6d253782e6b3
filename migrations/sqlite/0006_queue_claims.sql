-- Claims walk the queue by id from where the last claim ended (see
-- `Store::claim`), so the index on the lease is no longer read, and every
-- lease would only have paid to keep it up to date.
DROP INDEX capture_queue_ready;
