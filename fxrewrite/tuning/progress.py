"""A progress bar for the tuning loops: tqdm on an interactive stderr, otherwise (or without tqdm) nothing.

>>> bar = Progress(False, 3, "repair")
>>> bar.update("refit conv1")
>>> bar.close()
>>> bar.bar is None
True
"""

from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """One bar of ``total`` steps (None: unknown) headed ``desc``; ``update`` advances it and may rename it."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # progress is cosmetic
                return
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, desc: str | None = None) -> None:
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description(desc, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
