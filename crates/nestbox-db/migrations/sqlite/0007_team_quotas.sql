-- Per-team quotas set by platform admins; NULL: no limit. Usage is counted from the
-- sandboxes and templates tables when a request would add to it.
ALTER TABLE teams ADD COLUMN max_running INTEGER;
ALTER TABLE teams ADD COLUMN max_paused INTEGER;
ALTER TABLE teams ADD COLUMN max_vcpus INTEGER;
ALTER TABLE teams ADD COLUMN max_memory_mb INTEGER;
ALTER TABLE teams ADD COLUMN max_disk_mb INTEGER;
ALTER TABLE teams ADD COLUMN max_templates INTEGER;
