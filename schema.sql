-- livecomments PostgreSQL schema, version 1: the baseline migration.
-- `livecomments init-db` runs this file, then each later version's file in
-- service/db/migrations/ (NNNN_name.sql), one transaction each, and keeps
-- the version in schema_version (service/db/schema.py). SQLite's version 1
-- is service/db/migrations/0001_baseline.sqlite.sql. The schema the code
-- reads and writes is service/db/tables.py's metadata; tests/test_schema.py
-- checks that this file plus the migrations make exactly that, on both.
-- IF NOT EXISTS throughout: run on a database from before versions, it
-- creates only what is missing. Never edit it: add a migration.

-- The last seq handed out per content. Writers of one content take the
-- next seq by updating this row, so its row lock orders them by commit.
CREATE TABLE IF NOT EXISTS content_seqs (
    content_id BIGINT PRIMARY KEY,
    last_seq   BIGINT NOT NULL
);

-- One row per comment; a deletion keeps the row as a tombstone
-- (body NULL, deleted true) and moves it to a new seq.
CREATE TABLE IF NOT EXISTS comments (
    id         BIGSERIAL PRIMARY KEY,
    content_id BIGINT      NOT NULL,
    author_id  BIGINT      NOT NULL,
    body       TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    seq        BIGINT      NOT NULL,
    deleted    BOOLEAN     NOT NULL DEFAULT false
);

-- The changes feed (seq > cursor) and the latest page both read by this.
CREATE UNIQUE INDEX IF NOT EXISTS comments_content_seq ON comments (content_id, seq);

-- One row per author who has posted: the moment (microseconds since the
-- epoch) their token bucket is full again. A post updates it with one
-- upsert whose row lock orders the author's posts (service/limits.py).
CREATE TABLE IF NOT EXISTS author_limits (
    author_id  BIGINT PRIMARY KEY,
    full_at_us BIGINT NOT NULL
);

-- One row per Idempotency-Key an author sent with a stored post: what it
-- asked for and what it answered, so a retry gets the same answer
-- (service/idempotency.py). seq is the comment's seq when posted.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    author_id    BIGINT      NOT NULL,
    key          TEXT        NOT NULL,
    content_id   BIGINT      NOT NULL,
    request_hash TEXT        NOT NULL,
    comment_id   BIGINT      NOT NULL,
    seq          BIGINT      NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (author_id, key)
);

-- Expired keys are swept by age.
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
