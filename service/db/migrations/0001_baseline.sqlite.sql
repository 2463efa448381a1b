-- Schema version 1 on SQLite: what the service created before versions
-- (schema.sql's twin, in SQLite's terms). IF NOT EXISTS: run on an
-- unversioned database, it creates only what is missing.

CREATE TABLE IF NOT EXISTS author_limits (
    author_id BIGINT NOT NULL,
    full_at_us BIGINT NOT NULL,
    PRIMARY KEY (author_id)
);

CREATE TABLE IF NOT EXISTS comments (
    id INTEGER NOT NULL,
    content_id BIGINT NOT NULL,
    author_id BIGINT NOT NULL,
    body TEXT,
    created_at DATETIME NOT NULL,
    seq BIGINT NOT NULL,
    deleted BOOLEAN DEFAULT 0 NOT NULL,
    PRIMARY KEY (id)
);
CREATE UNIQUE INDEX IF NOT EXISTS comments_content_seq ON comments (content_id, seq);

CREATE TABLE IF NOT EXISTS content_seqs (
    content_id BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (content_id)
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    author_id BIGINT NOT NULL,
    "key" TEXT NOT NULL,
    content_id BIGINT NOT NULL,
    request_hash TEXT NOT NULL,
    comment_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    created_at DATETIME NOT NULL,
    PRIMARY KEY (author_id, "key")
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
