-- A paused sandbox with `auto_resume` is resumed by the first request that reaches one of
-- its ports (E2B's `autoResume`).
ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 0;
