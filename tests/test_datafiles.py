"""Finding the files shipped beside the package, in a checkout or an install."""

from __future__ import annotations

import sys

import pytest

from service.config.datafiles import data_file


def test_a_checkout_finds_the_file_beside_the_package():
    assert data_file("docs/openapi.yaml").read_text().startswith("openapi: 3.1")
    assert data_file("schema.sql").is_file()


def test_an_install_finds_the_file_in_share(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "livecomments" / "only-installed.yaml"
    installed.parent.mkdir(parents=True)
    installed.write_text("x")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert data_file("docs/only-installed.yaml") == installed


def test_a_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        data_file("docs/nothing.yaml")
