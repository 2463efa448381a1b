"""The rules every layer shares, each in one place: the error document and
its codes, the store's "did not answer" error, backoff with jitter, and the
loop pass that must not kill its thread. Imports nothing else of the service."""
