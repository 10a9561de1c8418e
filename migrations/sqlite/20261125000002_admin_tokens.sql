-- Bearer tokens for the admin JSON API. Only the SHA-256 of a token is stored.
CREATE TABLE dbsync_admin_tokens (
    id              BLOB PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    token_hash      BLOB NOT NULL UNIQUE,
    token_prefix    TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    last_used_at    TEXT,
    revoked_by      TEXT,
    revoked_at      TEXT
);
