"""``PassManager``: runs a pipeline of passes over one GraphModule, lints and recompiles after each, and wraps
errors with the pass that raised them (its docstring shows an example)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fxrewrite.errors import ConfigError, PassFailure
from fxrewrite.graph.rewriter import caller_recompiles, portable
from fxrewrite.graph.select import Rule
from fxrewrite.graph.sites import dropping_hooks
from fxrewrite.report.report import SiteRecord

from .interface import Pass, PassResult


class PassManager:
    """Runs a pipeline of passes; lints and recompiles after each; wraps errors with the pass that raised.

    ``drop_hooks=True`` lets the passes rewrite convs that have hooks (the new modules have none; each record counts
    them in ``details["dropped_hooks"]``); by default such convs are skipped as ``module-hooks``.

    >>> import torch
    >>> from fxrewrite.graph.capture import trace
    >>> from fxrewrite.passes import parse_pipeline
    >>> gm = trace(torch.nn.Conv2d(4, 8, 3))
    >>> result = PassManager(parse_pipeline("grouped{groups=2}"))(gm)
    >>> result.modified, result.graph_module.conv.groups
    (True, 2)

    Each pass's code is generated once (the pass's own ``finalize`` leaves it to the manager):

    >>> from unittest import mock
    >>> compile_code = torch.fx.GraphModule.recompile
    >>> manager = PassManager(parse_pipeline("depthwise-separable,grouped{groups=2}"))
    >>> gm = trace(torch.nn.Conv2d(4, 8, 3))
    >>> with mock.patch.object(torch.fx.GraphModule, "recompile", autospec=True, side_effect=compile_code) as spy:
    ...     result = manager(gm)
    >>> spy.call_count, [(r.site, r.status) for r in result.records]
    (2, [('conv', 'rewritten'), ('conv.0', 'skipped'), ('conv.1', 'rewritten')])
    """

    def __init__(self, passes: Iterable[Pass], rules: Sequence[Rule] = (), *, drop_hooks: bool = False) -> None:
        self.passes = list(passes)
        self.rules = list(rules)
        self.drop_hooks = drop_hooks

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        with dropping_hooks(gm, self.drop_hooks):
            return self._run(gm)

    def _run(self, gm: torch.fx.GraphModule) -> PassResult:
        records: list[SiteRecord] = []
        modified = False
        for p in self.passes:
            try:
                with caller_recompiles():  # the pass's finalize leaves lint and recompile to the next lines
                    result = p.run(gm, self.rules)
                gm = result.graph_module
                gm.graph.lint()
                gm.recompile()
            except ConfigError:
                raise
            except PassFailure:
                raise
            except Exception as exc:
                raise PassFailure(f"pass {p.name!r} failed: {exc}") from exc
            records.extend(result.records)
            modified |= result.modified
        return PassResult(portable(gm), modified, tuple(records))

    def plan(self, gm: torch.fx.GraphModule) -> list[SiteRecord]:
        """Plan every pass against the unchanged graph (a dry run changes nothing, so later passes see the input)."""
        records: list[SiteRecord] = []
        with dropping_hooks(gm, self.drop_hooks):
            for p in self.passes:
                records.extend(p.plan(gm, self.rules))
        return records
