"""All SQL: the tables, the engines, the store, the statements of a change
(seq, NOTIFY, the one-statement post, each written once), the posting
limit, idempotency keys and the NOTIFY listener. Every database error
leaves the store as ``service.common.errors.StoreUnavailable``."""
