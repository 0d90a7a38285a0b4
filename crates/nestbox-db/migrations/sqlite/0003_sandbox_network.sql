-- A sandbox's network settings: its egress rules (`{"allow_out": [...], "deny_out": [...]}`,
-- validated and normalised by the control plane) and whether its ports answer without the
-- traffic token.
ALTER TABLE sandboxes ADD COLUMN egress TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(egress));
ALTER TABLE sandboxes ADD COLUMN public_traffic INTEGER NOT NULL DEFAULT 0;
