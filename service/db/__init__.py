"""All SQL: the tables, the engines, the store and its one-statement post,
the posting limits, idempotency keys and the NOTIFY listener."""
