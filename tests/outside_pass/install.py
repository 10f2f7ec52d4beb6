"""Install a distribution without pip: write its ``NAME-VERSION.dist-info`` (METADATA and entry_points.txt) into a
folder; with that folder on ``sys.path``, ``importlib.metadata`` finds it like any installed distribution.

>>> import importlib.metadata, sys, tempfile
>>> root = tempfile.mkdtemp()
>>> _ = write_distribution(root, "demo-dist", {"demo.group": {"x": "json:dumps"}})
>>> sys.path.insert(0, root)
>>> [ep.value for ep in importlib.metadata.entry_points(group="demo.group")]
['json:dumps']
>>> sys.path.remove(root)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def write_distribution(root: str | Path, name: str, entry_points: Mapping[str, Mapping[str, str]],
                       version: str = "0.1") -> Path:
    """Write ``root/<name>-<version>.dist-info`` declaring ``entry_points`` (group -> {name: "module:attr"})."""
    info = Path(root) / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    sections = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(sections), encoding="utf-8")
    return info
