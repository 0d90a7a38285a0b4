-- A draining (cordoned) host takes no new sandboxes; what it holds stays until moved or
-- destroyed. Set and cleared by platform admins (or the BYOC team that owns the host).
ALTER TABLE hosts ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
