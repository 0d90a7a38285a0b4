-- Template builds: a recipe run in a sandbox, its steps' outcomes and its log.
CREATE TABLE template_builds (
    id            TEXT PRIMARY KEY,
    team_id       TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    recipe        TEXT NOT NULL,
    steps         TEXT NOT NULL,
    error         TEXT,
    template_id   TEXT,
    sandbox_id    TEXT,
    cached_steps  INTEGER NOT NULL DEFAULT 0,
    cancel        INTEGER NOT NULL DEFAULT 0,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    deadline      TEXT NOT NULL,
    finished_at   TEXT
) STRICT;
CREATE INDEX template_builds_team_idx ON template_builds (team_id, created_at);
CREATE INDEX template_builds_status_idx ON template_builds (status);

-- A build's log, line by line; `seq` counts from 0 per build.
CREATE TABLE template_build_logs (
    build_id  TEXT NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    step      INTEGER NOT NULL,
    stream    TEXT NOT NULL,
    text      TEXT NOT NULL,
    at        TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
) STRICT;

-- Archives uploaded for copy steps, per team, named by the SHA-256 of their bytes.
CREATE TABLE template_build_files (
    team_id     TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    hash        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    data        BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    used_at     TEXT NOT NULL,
    PRIMARY KEY (team_id, hash)
) STRICT;

-- The step cache: the snapshot taken after a step, keyed by everything that led to it.
-- Its template is hidden (`ephemeral`) and goes with the entry.
CREATE TABLE template_build_cache (
    team_id      TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    key          TEXT NOT NULL,
    template_id  TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    size_bytes   INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    used_at      TEXT NOT NULL,
    PRIMARY KEY (team_id, key)
) STRICT;
CREATE UNIQUE INDEX template_build_cache_template_idx ON template_build_cache (template_id);

-- What a built template gives its sandboxes: the recipe's environment at its end.
CREATE TABLE template_env (
    template_id  TEXT PRIMARY KEY REFERENCES templates (id) ON DELETE CASCADE,
    env          TEXT NOT NULL
) STRICT;
