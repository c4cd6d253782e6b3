-- Retention prunes each plugin config's log lines and each project's dead
-- letters older than the project's quota (see `retention.rs`): ranges on
-- these indexes, so a round that finds nothing to prune reads nothing.
CREATE INDEX plugin_logs_by_config_time ON plugin_logs (plugin_config_id, at);
CREATE INDEX dead_letters_by_project_time ON dead_letters (project_id, created_at);
