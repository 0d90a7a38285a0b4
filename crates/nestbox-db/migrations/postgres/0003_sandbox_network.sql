-- A sandbox's network settings: its egress rules (`{"allow_out": [...], "deny_out": [...]}`,
-- validated and normalised by the control plane) and whether its ports answer without the
-- traffic token.
ALTER TABLE sandboxes ADD COLUMN egress jsonb NOT NULL DEFAULT '{}';
ALTER TABLE sandboxes ADD COLUMN public_traffic boolean NOT NULL DEFAULT false;
