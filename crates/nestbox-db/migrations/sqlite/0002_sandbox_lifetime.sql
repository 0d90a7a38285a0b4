-- A sandbox's absolute lifetime (E2B's `timeout`): while it runs, it ends at `expires_at`
-- (destroyed, or paused when `on_expiry` is 'pause'); `lifetime_sec` is what a resume
-- without an explicit lifetime applies again. NULL: no deadline (only inactivity applies).
ALTER TABLE sandboxes ADD COLUMN expires_at TEXT;
ALTER TABLE sandboxes ADD COLUMN lifetime_sec INTEGER;
ALTER TABLE sandboxes ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'destroy'
    CHECK (on_expiry IN ('destroy', 'pause'));
CREATE INDEX sandboxes_expiry_idx ON sandboxes (status, expires_at);
