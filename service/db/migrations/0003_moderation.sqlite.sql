-- Schema version 3 on SQLite: moderation (issue 15). PostgreSQL's twin is
-- 0003_moderation.postgresql.sql (the same in SQLite's type names); the
-- two make the same tables and indexes (tests/test_schema.py).
--
-- Every moderation action is a change of its content with a seq of its own,
-- taken from content_seqs like a comment's, in the action's transaction
-- (service/db/moderation.py). Existing contents stay unmoderated: no row.

-- A content's room, once a moderator changed it: closed to new comments,
-- slow mode (seconds between one author's comments, 0 off) and the pinned
-- comment. A content without a row is open, not slow, with nothing pinned.
CREATE TABLE IF NOT EXISTS rooms (
    content_id        BIGINT NOT NULL,
    closed            BOOLEAN NOT NULL,
    slow_mode_seconds INTEGER NOT NULL,
    pinned_comment_id BIGINT,
    PRIMARY KEY (content_id)
);

-- The bans of each content, one row per banned author: until NULL is for
-- good; retracted counts the comments it turned into tombstones. Lifting a
-- ban deletes its row; a row whose until has passed is no
-- ban (ignored, and replaced by the next ban of the author).
CREATE TABLE IF NOT EXISTS bans (
    content_id   BIGINT      NOT NULL,
    author_id    BIGINT      NOT NULL,
    until        DATETIME,
    reason       TEXT,
    moderator_id BIGINT      NOT NULL,
    created_at   DATETIME NOT NULL,
    retracted    INTEGER     NOT NULL,
    PRIMARY KEY (content_id, author_id)
);

-- The moderation changes of each content's feed (ban, unban, room), beside
-- its comments: data is the event's fields as a JSON object.
CREATE TABLE IF NOT EXISTS content_events (
    content_id   BIGINT      NOT NULL,
    seq          BIGINT      NOT NULL,
    type         TEXT        NOT NULL,
    moderator_id BIGINT,
    data         TEXT        NOT NULL,
    created_at   DATETIME NOT NULL,
    PRIMARY KEY (content_id, seq)
);

-- An author's comments in a content, newest last: slow mode, duplicates
-- and a ban's retraction read by this.
CREATE INDEX IF NOT EXISTS comments_content_author ON comments (content_id, author_id, created_at);
