"""Measurement: analytic cost (MACs, params, activation bytes from node metadata) and measured latency."""
