"""Settings: every tunable with its default, read from the environment and
the command line. Imports nothing else of the service.

- ``settings``: the declarations (default, variable, help, parser) and the
  checks of every setting;
- ``environment``: reading the ``LIVECOMMENTS_*`` variables and the flags'
  text into values;
- ``parsers``: the parsers settings declare for their text;
- ``secret``: the development secret kept in the working directory;
- ``datafiles``: files shipped beside the package.
"""
