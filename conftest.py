"""Session-wide test setup for every test path (tests/, the doctests in fxrewrite/ and passes/).

Temporary files go under pytest's own base folder, which pytest prunes (it keeps the last three runs), instead of
piling up in the system's: the doctests show ``tempfile.mkdtemp()`` in their examples, and the CLI tests run
subprocesses that make temp folders of their own. torch's compile cache stays where it was (it lives in the temp
folder by default; a fresh one each run would recompile for minutes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _temp_files_under_pytest_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    folder = str(tmp_path_factory.mktemp("tempfile"))
    saved_dir = tempfile.tempdir
    saved_env = {key: os.environ.get(key) for key in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    try:  # pin inductor's cache to its usual place before the temp folder moves
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir())
    except ImportError:
        pass
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder  # subprocesses
    try:
        yield
    finally:
        tempfile.tempdir = saved_dir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
