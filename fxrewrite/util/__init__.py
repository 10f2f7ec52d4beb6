"""Small helpers every layer may use: input normalisation, devices and eval mode, distributed sums, formatting,
atomic file writes."""
