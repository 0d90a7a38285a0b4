-- Sessions of the web dashboard: the browser holds a random secret in an HttpOnly cookie,
-- the database only its SHA-256. Signing out deletes the row, so a copied cookie stops
-- working at once; expired rows are deleted when new sessions are made.
CREATE TABLE browser_sessions (
    token_hash   text        PRIMARY KEY,
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);
CREATE INDEX browser_sessions_user_idx ON browser_sessions (user_id);
CREATE INDEX browser_sessions_expiry_idx ON browser_sessions (expires_at);
