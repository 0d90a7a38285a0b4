-- Template builds: a recipe run in a sandbox, its steps' outcomes and its log.
CREATE TABLE template_builds (
    id            uuid        PRIMARY KEY,
    team_id       uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name          text        NOT NULL,
    status        text        NOT NULL,
    recipe        jsonb       NOT NULL,
    steps         jsonb       NOT NULL,
    error         text,
    template_id   uuid,
    sandbox_id    uuid,
    cached_steps  bigint      NOT NULL DEFAULT 0,
    cancel        boolean     NOT NULL DEFAULT false,
    created_by    text        NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    deadline      timestamptz NOT NULL,
    finished_at   timestamptz
);
CREATE INDEX template_builds_team_idx ON template_builds (team_id, created_at);
CREATE INDEX template_builds_status_idx ON template_builds (status);

-- A build's log, line by line; `seq` counts from 0 per build.
CREATE TABLE template_build_logs (
    build_id  uuid        NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    seq       bigint      NOT NULL,
    step      bigint      NOT NULL,
    stream    text        NOT NULL,
    text      text        NOT NULL,
    at        timestamptz NOT NULL,
    PRIMARY KEY (build_id, seq)
);

-- Archives uploaded for copy steps, per team, named by the SHA-256 of their bytes.
CREATE TABLE template_build_files (
    team_id     uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    hash        text        NOT NULL,
    size        bigint      NOT NULL,
    data        bytea       NOT NULL,
    created_at  timestamptz NOT NULL,
    used_at     timestamptz NOT NULL,
    PRIMARY KEY (team_id, hash)
);

-- The step cache: the snapshot taken after a step, keyed by everything that led to it.
-- Its template is hidden (`ephemeral`) and goes with the entry.
CREATE TABLE template_build_cache (
    team_id      uuid        NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    key          text        NOT NULL,
    template_id  uuid        NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    size_bytes   bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    used_at      timestamptz NOT NULL,
    PRIMARY KEY (team_id, key)
);
CREATE UNIQUE INDEX template_build_cache_template_idx ON template_build_cache (template_id);

-- What a built template gives its sandboxes: the recipe's environment at its end.
CREATE TABLE template_env (
    template_id  uuid  PRIMARY KEY REFERENCES templates (id) ON DELETE CASCADE,
    env          jsonb NOT NULL
);
