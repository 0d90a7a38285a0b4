-- Nestbox schema, SQLite. The PostgreSQL twin is migrations/postgres/0001_init.sql: same tables,
-- columns, constraints and indexes; change both together.
--
-- Conventions: STRICT tables; ids are lower-case hyphenated UUID text; times are fixed-width
-- RFC 3339 text with microseconds and 'Z' (2025-01-31T12:00:00.123456Z), so text order is time
-- order; booleans are 0/1 integers; JSON is text checked with json_valid; enums are text with
-- CHECK constraints using the wire spellings.

-- Teams. The all-zero id is the platform team: owner of shared templates.
CREATE TABLE teams (
    id          TEXT        PRIMARY KEY,
    name        TEXT        NOT NULL,
    is_byoc     INTEGER     NOT NULL DEFAULT 0,
    created_at  TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    deleted_at  TEXT
) STRICT;

INSERT INTO teams (id, name) VALUES ('00000000-0000-0000-0000-000000000000', 'Platform');

-- Users. Emails are stored lower-cased by the application.
CREATE TABLE users (
    id            TEXT        PRIMARY KEY,
    email         TEXT        NOT NULL,
    name          TEXT        NOT NULL DEFAULT '',
    password_hash TEXT,
    is_admin      INTEGER     NOT NULL DEFAULT 0,
    status        TEXT        NOT NULL DEFAULT 'active',
    created_at    TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    updated_at    TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_status_check CHECK (status IN ('active', 'disabled'))
) STRICT;
CREATE INDEX users_page_idx ON users (created_at DESC, id DESC);

-- Memberships. At most one default team per user, at most one owner per team.
CREATE TABLE team_members (
    team_id     TEXT        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id     TEXT        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        TEXT        NOT NULL,
    is_default  INTEGER     NOT NULL DEFAULT 0,
    created_at  TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    PRIMARY KEY (team_id, user_id),
    CONSTRAINT team_members_role_check CHECK (role IN ('owner', 'admin', 'member'))
) STRICT;
CREATE INDEX team_members_user_idx ON team_members (user_id);
CREATE UNIQUE INDEX team_members_one_default_idx ON team_members (user_id) WHERE is_default;
CREATE UNIQUE INDEX team_members_one_owner_idx ON team_members (team_id) WHERE role = 'owner';

-- Team API keys: only the sha256 of the key is stored; the prefix is for display.
CREATE TABLE api_keys (
    id           TEXT        PRIMARY KEY,
    team_id      TEXT        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         TEXT        NOT NULL,
    prefix       TEXT        NOT NULL,
    key_hash     TEXT        NOT NULL,
    created_by   TEXT        REFERENCES users (id) ON DELETE SET NULL,
    created_at   TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    last_used_at TEXT,
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash)
) STRICT;
CREATE INDEX api_keys_team_idx ON api_keys (team_id, created_at);

-- Hosts running the host agent. A BYOC host belongs to exactly one team; a regular host to none.
CREATE TABLE hosts (
    id                TEXT        PRIMARY KEY,
    name              TEXT        NOT NULL,
    kind              TEXT        NOT NULL DEFAULT 'regular',
    team_id           TEXT        REFERENCES teams (id) ON DELETE CASCADE,
    status            TEXT        NOT NULL DEFAULT 'pending',
    address           TEXT,
    version           TEXT,
    vcpus             INTEGER     NOT NULL DEFAULT 0,
    memory_mb         INTEGER     NOT NULL DEFAULT 0,
    disk_mb           INTEGER     NOT NULL DEFAULT 0,
    max_sandboxes     INTEGER,
    token_hash        TEXT,
    last_heartbeat_at TEXT,
    created_at        TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    updated_at        TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    CONSTRAINT hosts_token_hash_key UNIQUE (token_hash),
    CONSTRAINT hosts_kind_check CHECK (kind IN ('regular', 'byoc')),
    CONSTRAINT hosts_status_check CHECK (status IN ('pending', 'online', 'unreachable')),
    CONSTRAINT hosts_byoc_team_check CHECK ((kind = 'byoc') = (team_id IS NOT NULL))
) STRICT;
CREATE INDEX hosts_status_idx ON hosts (status);
CREATE INDEX hosts_team_idx ON hosts (team_id);

-- One-time registration tokens (hashed). Consumed by setting used_at.
CREATE TABLE host_registration_tokens (
    id          TEXT        PRIMARY KEY,
    host_id     TEXT        NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    token_hash  TEXT        NOT NULL,
    expires_at  TEXT        NOT NULL,
    used_at     TEXT,
    created_at  TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    CONSTRAINT host_registration_tokens_token_hash_key UNIQUE (token_hash)
) STRICT;
CREATE INDEX host_registration_tokens_host_idx ON host_registration_tokens (host_id);

-- Templates. team_id = all-zero for platform templates. host_id says where the files are
-- (NULL = on every host); the row goes with its host, as its files do.
CREATE TABLE templates (
    id           TEXT        PRIMARY KEY,
    team_id      TEXT        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         TEXT        NOT NULL,
    kind         TEXT        NOT NULL,
    vcpus        INTEGER     NOT NULL,
    memory_mb    INTEGER     NOT NULL,
    disk_size_mb INTEGER     NOT NULL,
    size_bytes   INTEGER     NOT NULL DEFAULT 0,
    host_id      TEXT        REFERENCES hosts (id) ON DELETE CASCADE,
    created_by   TEXT,
    created_at   TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    updated_at   TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    CONSTRAINT templates_team_id_name_key UNIQUE (team_id, name),
    CONSTRAINT templates_kind_check CHECK (kind IN ('image', 'snapshot'))
) STRICT;
CREATE INDEX templates_host_idx ON templates (host_id);

-- Sandboxes. Rows stay after the sandbox is destroyed (status stopped): they are its history.
CREATE TABLE sandboxes (
    id             TEXT        PRIMARY KEY,
    team_id        TEXT        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    host_id        TEXT        REFERENCES hosts (id) ON DELETE SET NULL,
    template_id    TEXT        REFERENCES templates (id) ON DELETE SET NULL,
    template_name  TEXT        NOT NULL,
    status         TEXT        NOT NULL DEFAULT 'pending',
    error          TEXT,
    vcpus          INTEGER     NOT NULL,
    memory_mb      INTEGER     NOT NULL,
    disk_size_mb   INTEGER     NOT NULL DEFAULT 5120,
    timeout_sec    INTEGER     NOT NULL,
    env            TEXT        NOT NULL DEFAULT '{}' CHECK (json_valid(env)),
    created_by     TEXT        NOT NULL,
    created_at     TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    started_at     TEXT,
    stopped_at     TEXT,
    last_active_at TEXT,
    updated_at     TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    CONSTRAINT sandboxes_status_check CHECK (
        status IN ('pending', 'starting', 'running', 'paused', 'stopped', 'error', 'missing'))
) STRICT;
CREATE INDEX sandboxes_team_page_idx ON sandboxes (team_id, created_at DESC, id DESC);
CREATE INDEX sandboxes_host_status_idx ON sandboxes (host_id, status);
CREATE INDEX sandboxes_status_idx ON sandboxes (status);
CREATE INDEX sandboxes_template_idx ON sandboxes (template_id);

-- User metadata of a sandbox, one row per key, so that filters are portable SQL.
CREATE TABLE sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, key)
) STRICT;
CREATE INDEX sandbox_metadata_key_value_idx ON sandbox_metadata (key, value);

-- Audit log. No foreign keys: entries outlive what they describe. Ids of actors and resources
-- are prefixed text (polymorphic).
CREATE TABLE audit_logs (
    id            TEXT        PRIMARY KEY,
    team_id       TEXT,
    actor_type    TEXT        NOT NULL,
    actor_id      TEXT,
    action        TEXT        NOT NULL,
    resource_type TEXT        NOT NULL,
    resource_id   TEXT,
    status        TEXT        NOT NULL,
    details       TEXT        NOT NULL DEFAULT '{}' CHECK (json_valid(details)),
    created_at    TEXT        NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    CONSTRAINT audit_logs_actor_type_check CHECK (actor_type IN ('user', 'api_key', 'host', 'system')),
    CONSTRAINT audit_logs_status_check CHECK (status IN ('success', 'failure'))
) STRICT;
CREATE INDEX audit_logs_team_page_idx ON audit_logs (team_id, created_at DESC, id DESC);
CREATE INDEX audit_logs_page_idx ON audit_logs (created_at DESC, id DESC);

-- Per-sandbox metric samples flushed from the host agent's ring buffers.
CREATE TABLE sandbox_metric_points (
    sandbox_id  TEXT             NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    tier        TEXT             NOT NULL,
    ts_ms       INTEGER          NOT NULL,
    cpu_pct     REAL             NOT NULL,
    mem_bytes   INTEGER          NOT NULL,
    disk_bytes  INTEGER          NOT NULL,
    PRIMARY KEY (sandbox_id, tier, ts_ms),
    CONSTRAINT sandbox_metric_points_tier_check CHECK (tier IN ('10m', '2h', '24h'))
) STRICT;
