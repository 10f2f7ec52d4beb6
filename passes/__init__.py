"""The passes, one per file, and the open registry that pipeline strings, budgets, replay and the CLI read.

A pass is a frozen dataclass (its fields are its options) that subclasses ``Pass`` or, for a conv replacement,
``ConvRewritePass``; ``register`` adds one (usable as a class decorator), and installed distributions add theirs
through the ``fxrewrite.passes`` entry-point group (see ``fxrewrite.passes.registry``).

>>> sorted(REGISTRY)
['channel-shuffle', 'depthwise-bottleneck', 'depthwise-separable', 'grouped', 'grouped-bottleneck', 'grouped-separable']
"""

from __future__ import annotations

from .bottleneck import DepthwiseBottleneck, GroupedBottleneck
from .channel_shuffle import ChannelShuffle, channel_shuffle
from .conv_rewrite import ConvRewritePass
from .grouped import Grouped
from .interface import Built, Pass, PassResult
from .manager import PassManager
from .pipeline import parse_pipeline as _parse
from .pipeline import parse_spec
from .registry import REGISTRY, discover, pass_class, register, unregister
from .separable import DepthwiseSeparable, GroupedSeparable

for _cls in (DepthwiseSeparable, GroupedSeparable, Grouped, ChannelShuffle, DepthwiseBottleneck, GroupedBottleneck):
    register(_cls)
del _cls


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"grouped{groups=4},channel-shuffle"`` against the registered passes."""
    return _parse(text, REGISTRY)


__all__ = [
    "REGISTRY",
    "Built",
    "ChannelShuffle",
    "ConvRewritePass",
    "DepthwiseBottleneck",
    "DepthwiseSeparable",
    "Grouped",
    "GroupedBottleneck",
    "GroupedSeparable",
    "Pass",
    "PassManager",
    "PassResult",
    "channel_shuffle",
    "discover",
    "parse_pipeline",
    "parse_spec",
    "pass_class",
    "register",
    "unregister",
]
