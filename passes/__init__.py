"""The built-in passes, one per file, and the registry that pipeline strings are parsed against.

>>> sorted(REGISTRY)
['channel-shuffle', 'depthwise-bottleneck', 'depthwise-separable', 'grouped', 'grouped-bottleneck', 'grouped-separable']
"""

from __future__ import annotations

from fxrewrite.errors import ConfigError

from .base import Pass, PassManager, PassResult
from .base import parse_pipeline as _parse
from .bottleneck import DepthwiseBottleneck, GroupedBottleneck
from .channel_shuffle import ChannelShuffle, channel_shuffle
from .grouped import Grouped
from .separable import DepthwiseSeparable, GroupedSeparable

REGISTRY: dict[str, type[Pass]] = {
    p.name: p
    for p in (DepthwiseSeparable, GroupedSeparable, Grouped, ChannelShuffle, DepthwiseBottleneck, GroupedBottleneck)
}


def pass_class(name: str) -> type[Pass]:
    """The registered pass class of a CLI name (``ConfigError`` naming the valid ones when there is none)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"no pass named {name!r} in this fxrewrite; valid passes: {', '.join(sorted(REGISTRY))}")
    return cls


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"grouped{groups=4},channel-shuffle"`` against the built-in passes."""
    return _parse(text, REGISTRY)


__all__ = [
    "REGISTRY",
    "ChannelShuffle",
    "DepthwiseBottleneck",
    "DepthwiseSeparable",
    "Grouped",
    "GroupedBottleneck",
    "GroupedSeparable",
    "Pass",
    "PassManager",
    "PassResult",
    "channel_shuffle",
    "parse_pipeline",
    "pass_class",
]
