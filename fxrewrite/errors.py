"""The project's error classes: one base, ``FxRewriteError``, so callers can catch everything fxrewrite raises.

Every error says what went wrong, where (layer, pass, file:line) and what to do about it.

>>> from fxrewrite.errors import FxRewriteError, ConfigError
>>> issubclass(ConfigError, FxRewriteError)
True
"""

from __future__ import annotations


class FxRewriteError(Exception):
    """Base class of every error raised by fxrewrite."""


class TraceFailure(FxRewriteError):
    """The model could not be captured as a torch.fx graph; the message names the user's code and the fix."""


class ConfigError(FxRewriteError):
    """A pass, option, pipeline string or selector is invalid (all problems are reported together)."""


class PassFailure(FxRewriteError):
    """A pass raised while rewriting; the message names the pass and the site, and chains the cause."""


class ModelLoadError(FxRewriteError):
    """A model spec could not be resolved into an ``nn.Module``."""


class VerificationFailure(FxRewriteError):
    """A verification gate failed (shape mismatch, non-finite output, error above tolerance)."""


class ArtifactError(FxRewriteError):
    """An artifact could not be written; nothing partial was left behind."""
