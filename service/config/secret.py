"""The development secret: a token-signing key generated for ``dev`` mode
and kept in a file of the working directory, so that ``mint-token`` run
from the same place signs tokens the development server accepts."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: File in the working directory that keeps the generated development
#: secret, so that ``mint-token`` run from the same place signs tokens the
#: development server accepts.
DEV_SECRET_FILE = ".livecomments-dev-secret"


def dev_secret_path(workdir="."):
    return Path(workdir) / DEV_SECRET_FILE


def read_dev_secret(workdir="."):
    """The development secret kept in ``workdir``, or None if there is none."""
    try:
        return dev_secret_path(workdir).read_text().strip() or None
    except FileNotFoundError:
        return None


def dev_secret(workdir="."):
    """The development secret kept in ``workdir``, generated first if there
    is none yet."""
    try:
        # Created 0600 from the start: never readable by others, not
        # even for a moment; O_EXCL keeps a racing process's secret.
        fd = os.open(dev_secret_path(workdir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    return read_dev_secret(workdir)
