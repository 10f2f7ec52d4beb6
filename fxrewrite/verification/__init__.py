"""Verification: the shape check, the numerics (one recording run per model) and the gates of a rewrite."""
