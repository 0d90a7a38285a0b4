-- Nestbox schema, PostgreSQL. The SQLite twin is migrations/sqlite/0001_init.sql: same tables,
-- columns, constraints and indexes; change both together.
--
-- Conventions: ids are uuid; times are timestamptz, written by the application (truncated to
-- microseconds) so both engines store the same values; integers are bigint so they decode as
-- i64 on both engines; enums are text with CHECK constraints using the wire spellings.

-- Teams. The all-zero id is the platform team: owner of shared templates.
CREATE TABLE teams (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    is_byoc     boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

INSERT INTO teams (id, name) VALUES ('00000000-0000-0000-0000-000000000000', 'Platform');

-- Users. Emails are stored lower-cased by the application.
CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL,
    name          text        NOT NULL DEFAULT '',
    password_hash text,
    is_admin      boolean     NOT NULL DEFAULT false,
    status        text        NOT NULL DEFAULT 'active',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_status_check CHECK (status IN ('active', 'disabled'))
);
CREATE INDEX users_page_idx ON users (created_at DESC, id DESC);

-- Memberships. At most one default team per user, at most one owner per team.
CREATE TABLE team_members (
    team_id     uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text        NOT NULL,
    is_default  boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id),
    CONSTRAINT team_members_role_check CHECK (role IN ('owner', 'admin', 'member'))
);
CREATE INDEX team_members_user_idx ON team_members (user_id);
CREATE UNIQUE INDEX team_members_one_default_idx ON team_members (user_id) WHERE is_default;
CREATE UNIQUE INDEX team_members_one_owner_idx ON team_members (team_id) WHERE role = 'owner';

-- Team API keys: only the sha256 of the key is stored; the prefix is for display.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    team_id      uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    prefix       text        NOT NULL,
    key_hash     text        NOT NULL,
    created_by   uuid        REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash)
);
CREATE INDEX api_keys_team_idx ON api_keys (team_id, created_at);

-- Hosts running the host agent. A BYOC host belongs to exactly one team; a regular host to none.
CREATE TABLE hosts (
    id                uuid        PRIMARY KEY,
    name              text        NOT NULL,
    kind              text        NOT NULL DEFAULT 'regular',
    team_id           uuid        REFERENCES teams (id) ON DELETE CASCADE,
    status            text        NOT NULL DEFAULT 'pending',
    address           text,
    version           text,
    vcpus             bigint      NOT NULL DEFAULT 0,
    memory_mb         bigint      NOT NULL DEFAULT 0,
    disk_mb           bigint      NOT NULL DEFAULT 0,
    max_sandboxes     bigint,
    token_hash        text,
    last_heartbeat_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT hosts_token_hash_key UNIQUE (token_hash),
    CONSTRAINT hosts_kind_check CHECK (kind IN ('regular', 'byoc')),
    CONSTRAINT hosts_status_check CHECK (status IN ('pending', 'online', 'unreachable')),
    CONSTRAINT hosts_byoc_team_check CHECK ((kind = 'byoc') = (team_id IS NOT NULL))
);
CREATE INDEX hosts_status_idx ON hosts (status);
CREATE INDEX hosts_team_idx ON hosts (team_id);

-- One-time registration tokens (hashed). Consumed by setting used_at.
CREATE TABLE host_registration_tokens (
    id          uuid        PRIMARY KEY,
    host_id     uuid        NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    token_hash  text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT host_registration_tokens_token_hash_key UNIQUE (token_hash)
);
CREATE INDEX host_registration_tokens_host_idx ON host_registration_tokens (host_id);

-- Templates. team_id = all-zero for platform templates. host_id says where the files are
-- (NULL = on every host); the row goes with its host, as its files do.
CREATE TABLE templates (
    id           uuid        PRIMARY KEY,
    team_id      uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    kind         text        NOT NULL,
    vcpus        bigint      NOT NULL,
    memory_mb    bigint      NOT NULL,
    disk_size_mb bigint      NOT NULL,
    size_bytes   bigint      NOT NULL DEFAULT 0,
    host_id      uuid        REFERENCES hosts (id) ON DELETE CASCADE,
    created_by   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT templates_team_id_name_key UNIQUE (team_id, name),
    CONSTRAINT templates_kind_check CHECK (kind IN ('image', 'snapshot'))
);
CREATE INDEX templates_host_idx ON templates (host_id);

-- Sandboxes. Rows stay after the sandbox is destroyed (status stopped): they are its history.
CREATE TABLE sandboxes (
    id             uuid        PRIMARY KEY,
    team_id        uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    host_id        uuid        REFERENCES hosts (id) ON DELETE SET NULL,
    template_id    uuid        REFERENCES templates (id) ON DELETE SET NULL,
    template_name  text        NOT NULL,
    status         text        NOT NULL DEFAULT 'pending',
    error          text,
    vcpus          bigint      NOT NULL,
    memory_mb      bigint      NOT NULL,
    disk_size_mb   bigint      NOT NULL DEFAULT 5120,
    timeout_sec    bigint      NOT NULL,
    env            jsonb       NOT NULL DEFAULT '{}',
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    stopped_at     timestamptz,
    last_active_at timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sandboxes_status_check CHECK (
        status IN ('pending', 'starting', 'running', 'paused', 'stopped', 'error', 'missing'))
);
CREATE INDEX sandboxes_team_page_idx ON sandboxes (team_id, created_at DESC, id DESC);
CREATE INDEX sandboxes_host_status_idx ON sandboxes (host_id, status);
CREATE INDEX sandboxes_status_idx ON sandboxes (status);
CREATE INDEX sandboxes_template_idx ON sandboxes (template_id);

-- User metadata of a sandbox, one row per key, so that filters are portable SQL.
CREATE TABLE sandbox_metadata (
    sandbox_id uuid NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    key        text NOT NULL,
    value      text NOT NULL,
    PRIMARY KEY (sandbox_id, key)
);
CREATE INDEX sandbox_metadata_key_value_idx ON sandbox_metadata (key, value);

-- Audit log. No foreign keys: entries outlive what they describe. Ids of actors and resources
-- are prefixed text (polymorphic).
CREATE TABLE audit_logs (
    id            uuid        PRIMARY KEY,
    team_id       uuid,
    actor_type    text        NOT NULL,
    actor_id      text,
    action        text        NOT NULL,
    resource_type text        NOT NULL,
    resource_id   text,
    status        text        NOT NULL,
    details       jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_logs_actor_type_check CHECK (actor_type IN ('user', 'api_key', 'host', 'system')),
    CONSTRAINT audit_logs_status_check CHECK (status IN ('success', 'failure'))
);
CREATE INDEX audit_logs_team_page_idx ON audit_logs (team_id, created_at DESC, id DESC);
CREATE INDEX audit_logs_page_idx ON audit_logs (created_at DESC, id DESC);

-- Per-sandbox metric samples flushed from the host agent's ring buffers.
CREATE TABLE sandbox_metric_points (
    sandbox_id  uuid             NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    tier        text             NOT NULL,
    ts_ms       bigint           NOT NULL,
    cpu_pct     double precision NOT NULL,
    mem_bytes   bigint           NOT NULL,
    disk_bytes  bigint           NOT NULL,
    PRIMARY KEY (sandbox_id, tier, ts_ms),
    CONSTRAINT sandbox_metric_points_tier_check CHECK (tier IN ('10m', '2h', '24h'))
);
