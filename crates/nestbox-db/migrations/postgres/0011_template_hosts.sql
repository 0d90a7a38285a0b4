-- Which hosts hold a team template's files. A template is made on one host (`host_id`) and
-- copied to others as sandboxes from it are placed there; deleting it deletes the files
-- on every host listed here. Deleting a host drops its rows (and a template it alone held).
CREATE TABLE template_hosts (
    template_id uuid        NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    host_id     uuid        NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, host_id)
);
CREATE INDEX template_hosts_host_idx ON template_hosts (host_id);
INSERT INTO template_hosts (template_id, host_id)
    SELECT id, host_id FROM templates WHERE host_id IS NOT NULL;
