"""Session-wide test setup for every test path (tests/, the doctests in fxrewrite/ and passes/).

Temporary files go under pytest's own base folder, which pytest prunes (it keeps the last three runs), instead of
piling up in the system's: the doctests show ``tempfile.mkdtemp()`` in their examples, and the CLI tests run
subprocesses that make temp folders of their own.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _temp_files_under_pytest_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    folder = str(tmp_path_factory.mktemp("tempfile"))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder  # subprocesses
    try:
        yield
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
