"""The built-in passes, one per file, and the registry that pipeline strings are parsed against.

>>> sorted(REGISTRY)
['channel-shuffle', 'depthwise-bottleneck', 'depthwise-separable', 'grouped', 'grouped-bottleneck', 'grouped-separable']
"""

from __future__ import annotations

from .bottleneck import DepthwiseBottleneck, GroupedBottleneck
from .channel_shuffle import ChannelShuffle, channel_shuffle
from .grouped import Grouped
from .interface import Pass, PassResult
from .manager import PassManager
from .pipeline import parse_pipeline as _parse
from .registry import REGISTRY, pass_class, register
from .separable import DepthwiseSeparable, GroupedSeparable

for _cls in (DepthwiseSeparable, GroupedSeparable, Grouped, ChannelShuffle, DepthwiseBottleneck, GroupedBottleneck):
    register(_cls)
del _cls


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"grouped{groups=4},channel-shuffle"`` against the registered passes."""
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
