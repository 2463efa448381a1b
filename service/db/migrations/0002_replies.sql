-- Schema version 2: replies. Both databases run this file.
--
-- A reply names its parent (a comment of the same content) and keeps a
-- summary of it taken when the reply was posted: its author and the first
-- 80 characters of its body. Deleting the parent clears the excerpt and
-- sets parent_deleted on its replies, in the deletion's transaction
-- (service/db/replies.py). Existing comments become comments without a
-- parent: nothing is rewritten, no seq moves.

ALTER TABLE comments ADD COLUMN parent_id BIGINT;
ALTER TABLE comments ADD COLUMN parent_author_id BIGINT;
ALTER TABLE comments ADD COLUMN parent_excerpt TEXT;
ALTER TABLE comments ADD COLUMN parent_deleted BOOLEAN NOT NULL DEFAULT false;

-- A deletion finds the parent's replies by this.
CREATE INDEX IF NOT EXISTS comments_parent ON comments (parent_id);
