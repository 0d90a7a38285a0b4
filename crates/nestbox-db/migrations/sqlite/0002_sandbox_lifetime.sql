-- A sandbox's absolute lifetime (E2B's `timeout`): while it runs, it ends at `expires_at`
-- (destroyed, or paused when `on_expiry` is 'pause'); `lifetime_sec` is what a resume
-- without an explicit lifetime applies again. NULL: no deadline (only inactivity applies).
ALTER TABLE sandboxes ADD COLUMN expires_at TEXT;
ALTER TABLE sandboxes ADD COLUMN lifetime_sec INTEGER;
ALTER TABLE sandboxes ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'destroy'
    CHECK (on_expiry IN ('destroy', 'pause'));
CREATE INDEX sandboxes_expiry_idx ON sandboxes (status, expires_at);

-- Which sandbox a template was made from (E2B lists a sandbox's snapshots), and whether it
-- is a fork's one-off template: hidden from lists and lookups by name, deleted once no
-- sandbox uses it.
ALTER TABLE templates ADD COLUMN source_sandbox_id TEXT;
ALTER TABLE templates ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0;
CREATE INDEX templates_source_idx ON templates (source_sandbox_id);
