-- A paused sandbox being moved to another host (a drain, or an operator's move): the host
-- it goes to, the move (its package's id: only that move may finish or end it) and since
-- when. The sandbox stays on `host_id` (and `paused`) until the move
-- re-points it; meanwhile its copy on `moving_to` is not an orphan. A move whose control
-- plane went away is given up by the monitor after a deadline.
ALTER TABLE sandboxes ADD COLUMN moving_to TEXT REFERENCES hosts (id) ON DELETE SET NULL;
ALTER TABLE sandboxes ADD COLUMN moving_id TEXT;
ALTER TABLE sandboxes ADD COLUMN moving_since TEXT;
