"""Budgets: a target (MACs / params / latency), the candidate forms per site, calibration statistics, the
optimiser that picks one candidate per site, and the resulting plan."""
