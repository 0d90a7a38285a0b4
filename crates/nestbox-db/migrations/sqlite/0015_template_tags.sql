-- Tags: other names of a team template's builds (`name:tag`). The tag `default` is the
-- visible template called `name` itself and has no row here. A row points at the build's
-- template: the visible one, or a hidden (`ephemeral`) one that is kept while a tag or a
-- sandbox holds it.
CREATE TABLE template_tags (
    team_id      TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    tag          TEXT NOT NULL,
    template_id  TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (team_id, name, tag)
) STRICT;
CREATE INDEX template_tags_template_idx ON template_tags (template_id);

-- The tags a build gives its template (`["default"]` unless it asked for others).
ALTER TABLE template_builds ADD COLUMN tags TEXT NOT NULL DEFAULT '["default"]';

-- The user and directory a built template's sandboxes run commands as and in when they
-- name none (the recipe's last `user` and `workdir`); NULL: root, and the user's home.
ALTER TABLE template_env ADD COLUMN default_user TEXT;
ALTER TABLE template_env ADD COLUMN default_workdir TEXT;
