"""The columns a convolution multiplies (im2col), grouped: the data side of every least-squares fit and Gram
matrix in fxrewrite."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The columns a Conv2d multiplies: (groups, in_channels/groups * kh * kw, N * H_out * W_out), so that
    ``conv(x)`` for group j is ``W_j @ cols[j]`` with ``W_j = conv.weight[j*O/g:(j+1)*O/g].flatten(1)`` (plus bias).

    >>> conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
    >>> x = torch.randn(2, 4, 7, 7)
    >>> cols = im2col(conv, x)
    >>> w = conv.weight.reshape(2, 3, -1)
    >>> y = (w @ cols).reshape(2, 3, 2, 4, 4).permute(2, 0, 1, 3, 4).reshape(2, 6, 4, 4)
    >>> torch.testing.assert_close(y, conv(x))
    """
    g = conv.groups
    n = x.shape[0]
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and _no_padding(conv):
        cols = x.reshape(n, x.shape[1], -1)
    else:
        pad = conv._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.reshape(n, g, cols.shape[1] // g, -1).permute(1, 2, 0, 3).reshape(g, cols.shape[1] // g, -1)


def _no_padding(conv: nn.Conv2d) -> bool:
    return not any(conv._reversed_padding_repeated_twice)
