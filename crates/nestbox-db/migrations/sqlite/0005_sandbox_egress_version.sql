-- Every change of a sandbox's egress rules takes the next version, recorded before its
-- host is told; the host applies a change only if it is newer than the one it holds, so
-- concurrent changes end with the host and the database agreeing on the last one.
ALTER TABLE sandboxes ADD COLUMN egress_version INTEGER NOT NULL DEFAULT 0;
