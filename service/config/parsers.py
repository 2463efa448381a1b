"""Settings' text to values: the parsers the settings declare for their
variables and flags. Each raises ValueError naming what it expected."""

from __future__ import annotations

import ipaddress
import re


def parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0 or 1, got {text!r}")


def parse_rate(text):
    """Parse ``N/S`` (N events per S seconds); ``0`` turns the limit off."""
    text = text.strip()
    if text in ("0", "off", ""):
        return None
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+(?:\.\d+)?)", text)
    if not match or int(match[1]) < 1 or float(match[2]) <= 0:
        raise ValueError(f"expected N/S such as 5/10, or 0, got {text!r}")
    return int(match[1]), float(match[2])


def parse_origins(text):
    return tuple(origin.strip() for origin in text.split(",") if origin.strip())


def parse_networks(text):
    """Comma-separated IP addresses or networks (``127.0.0.1, 10.0.0.0/8``)."""
    return tuple(
        str(ipaddress.ip_network(item.strip(), strict=False))
        for item in text.split(",") if item.strip()
    )
