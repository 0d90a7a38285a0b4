-- Host credentials with a lifecycle: each row is one pair of an access token (a JWT whose
-- `jti` is the row's id; only its expiry is stored) and a refresh token (stored hashed).
-- Refreshing issues the next pair (`parent_id` names the one it replaced) and revokes the
-- old one; deleting a host deletes its pairs, which revokes every token it holds.
-- `confirmed_at`: the pair was seen in use (a heartbeat with its access token or a refresh
-- with its refresh token), so the pair it replaced can no longer be replayed.
CREATE TABLE host_credentials (
    id                 uuid        PRIMARY KEY,
    host_id            uuid        NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    refresh_hash       text        NOT NULL,
    parent_id          uuid,
    access_expires_at  timestamptz NOT NULL,
    refresh_expires_at timestamptz NOT NULL,
    confirmed_at       timestamptz,
    revoked_at         timestamptz,
    revoked_reason     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT host_credentials_refresh_hash_key UNIQUE (refresh_hash),
    CONSTRAINT host_credentials_reason_check
        CHECK (revoked_reason IS NULL OR revoked_reason IN ('rotated', 'replaced', 'reused'))
);
CREATE INDEX host_credentials_host_idx ON host_credentials (host_id);
CREATE INDEX host_credentials_parent_idx ON host_credentials (parent_id);
