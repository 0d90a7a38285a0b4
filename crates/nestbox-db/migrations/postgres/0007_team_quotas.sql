-- Per-team quotas set by platform admins; NULL: no limit. Usage is counted from the
-- sandboxes and templates tables when a request would add to it.
ALTER TABLE teams ADD COLUMN max_running bigint;
ALTER TABLE teams ADD COLUMN max_paused bigint;
ALTER TABLE teams ADD COLUMN max_vcpus bigint;
ALTER TABLE teams ADD COLUMN max_memory_mb bigint;
ALTER TABLE teams ADD COLUMN max_disk_mb bigint;
ALTER TABLE teams ADD COLUMN max_templates bigint;
