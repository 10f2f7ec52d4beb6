"""The maths: pure tensor code with no graph in sight. SVD factorisations, bottleneck (Tucker-2 / block-term / CP)
fits, channel-permutation search, least squares and the closed-form errors the budget predicts."""
