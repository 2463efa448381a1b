"""Settings: every tunable with its default, read from the environment and
the command line. Imports nothing else of the service."""
