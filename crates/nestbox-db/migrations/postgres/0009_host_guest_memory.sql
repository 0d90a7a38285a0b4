-- What a host's agent reports with each heartbeat about the memory that backs guest RAM
-- (its tmpfs): its size and how much of it sandboxes hold. NULL until reported; the
-- scheduler never places more there than it can back.
ALTER TABLE hosts ADD COLUMN guest_memory_mb bigint;
ALTER TABLE hosts ADD COLUMN guest_memory_used_mb bigint;
