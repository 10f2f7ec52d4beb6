"""fxrewrite: rewrite PyTorch convolutions into grouped / depthwise-separable forms at the torch.fx graph level,
carrying the trained weights over, and report what changed.

>>> import torch, fxrewrite
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3))
>>> result = fxrewrite.rewrite(model, (torch.randn(1, 3, 32, 32),), passes="depthwise-separable{rank=1}")
>>> [r.status for r in result.report.records]
['rewritten', 'rewritten']
"""

from __future__ import annotations

from fxrewrite.budget.target import BudgetInfeasible, Target
from fxrewrite.errors import (
    ConfigError,
    FxRewriteError,
    ModelLoadError,
    PassFailure,
    TraceFailure,
    VerificationFailure,
)
from fxrewrite.frontends.api import Plan, RewriteResult, plan, rewrite
from fxrewrite.graph.capture import trace
from fxrewrite.graph.patterns import Match, MatchFailure, NodePattern, Pattern
from fxrewrite.graph.select import Rule
from fxrewrite.graph.sites import ConvSite, ConvSpec, Reason, find_sites
from fxrewrite.io.artifacts import SavedArtifact, save
from fxrewrite.io.replay import RewritePlan, apply_plan, load_rewritten, plan_from_result
from fxrewrite.measure.latency import LatencyReport, measure_latency
from fxrewrite.report.report import Report, SiteRecord
from fxrewrite.tuning.distill import DistillResult, distill
from fxrewrite.tuning.records import RepairResult, SiteRepair
from fxrewrite.tuning.repair import load_calibration, repair
from fxrewrite.verification.result import Verification
from fxrewrite.verification.verify import verify
from fxrewrite.version import __version__

__all__ = [
    "BudgetInfeasible",
    "ConfigError",
    "ConvSite",
    "ConvSpec",
    "DistillResult",
    "FxRewriteError",
    "LatencyReport",
    "Match",
    "MatchFailure",
    "ModelLoadError",
    "NodePattern",
    "PassFailure",
    "Pattern",
    "Plan",
    "Reason",
    "RepairResult",
    "Report",
    "RewritePlan",
    "RewriteResult",
    "Rule",
    "SavedArtifact",
    "SiteRecord",
    "SiteRepair",
    "Target",
    "TraceFailure",
    "Verification",
    "VerificationFailure",
    "__version__",
    "apply_plan",
    "distill",
    "find_sites",
    "load_calibration",
    "load_rewritten",
    "measure_latency",
    "plan",
    "plan_from_result",
    "repair",
    "rewrite",
    "save",
    "trace",
    "verify",
]
