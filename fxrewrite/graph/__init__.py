"""Graph capture and analysis: tracing, shape metadata, convolution sites, selectors, patterns, channel coupling,
the rewriter (the only module that mutates graphs) and the interpreters that record node values."""
