"""Atomic file writes: a file (or several, or a folder of side files) appears complete or not at all.

>>> import tempfile
>>> target = Path(tempfile.mkdtemp()) / "a.txt"
>>> atomic_write_text(target, "hello").read_text()
'hello'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fxrewrite.errors import ArtifactError


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp makes 0600 files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def _temp_name(path: Path) -> tuple[int, str]:
    # the temporary keeps the final suffix: some loaders (torch.export.load) check it
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    with contextlib.suppress(OSError):
        os.chmod(name, _FILE_MODE)
    return fd, name


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: list[str | Path] | tuple[str | Path, ...]) -> Iterator[tuple[Path, ...]]:
    """Several files written together: every temporary is written first, then all are moved into place.

    A failure before the moves leaves none of the files; the moves themselves are ``os.replace`` calls in the same
    folder (a failure there, e.g. a full disk, is rolled back for files that did not exist before).
    """
    finals = [Path(p) for p in paths]
    for final in finals:
        if not final.parent.is_dir():
            raise ArtifactError(f"cannot write {final}: folder {final.parent} does not exist; create it first.")
    temps: list[Path] = []
    try:
        for final in finals:
            fd, name = _temp_name(final)
            os.close(fd)
            temps.append(Path(name))
        yield tuple(temps)
        _move_all(list(zip(temps, finals, strict=True)))
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _move_all(moves: list[tuple[Path, Path]]) -> None:
    """``os.replace`` each (src, dst) in order; on failure remove the destinations created by this call."""
    created: list[Path] = []
    try:
        for src, dst in moves:
            existed = dst.exists()
            os.replace(src, dst)
            if not existed:
                created.append(dst)
    except BaseException:
        for dst in created:
            dst.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; write ``path.name`` (and any side files) into it. On success every
    file in it is moved next to ``path`` - side files first, ``path`` last - and the folder removed; on error the
    folder and its contents are removed and nothing is moved."""
    final = Path(path)
    if not final.parent.is_dir():
        raise ArtifactError(f"cannot write {final}: folder {final.parent} does not exist; create it first.")
    tmpdir = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmpdir"))
    try:
        yield tmpdir
        main = tmpdir / final.name
        if not main.is_file():
            raise ArtifactError(f"nothing was written to {final.name} in the temporary folder")
        others = sorted(p for p in tmpdir.iterdir() if p != main)
        if any(not p.is_file() for p in others):
            raise ArtifactError(f"unexpected folders written next to {final.name}: {[p.name for p in others]}")
        _move_all([(p, final.parent / p.name) for p in others] + [(main, final)])
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
