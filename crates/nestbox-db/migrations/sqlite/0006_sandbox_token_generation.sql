-- A sandbox's guest and traffic tokens derive from the master secret, its id and this
-- generation; rotating them takes the next generation, so every earlier token stops
-- working (0: the tokens it was created with).
ALTER TABLE sandboxes ADD COLUMN token_generation INTEGER NOT NULL DEFAULT 0;
