"""Demonstrations that train a model and rewrite it (``python -m fxrewrite.demos.digits``)."""
