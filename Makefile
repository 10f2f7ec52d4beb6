# Every target creates .venv and installs what it needs; nothing has to be installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test test-zoo bench bench-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Pinned torch/torchvision: served from the local wheel cache on the dev machines.
$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[demo]"
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(STAMP_RUN)

# The main job: train a small CNN on scikit-learn's digits, rewrite it at 2x and 4x fewer conv MACs with each form,
# and print costs and accuracy (original / data-free / repaired / repaired + distillation); then a 1-D pitch
# classifier (synthetic tones, a single-channel 256-tap stem) rewritten by budgets (Target(macs=0.5) and 0.25).
run: $(STAMP_RUN)
	$(PY) -m fxrewrite.demos.digits
	$(PY) -m fxrewrite.demos.pitch

# The test suite without the model-zoo sweeps (those are marked slow and run by `make test-zoo`).
test: $(STAMP_TEST)
	$(PY) -m pytest -q -m "not slow"

# Every torchvision model: sites vs a hook count, exact rewrites, the robustness sweep.
test-zoo: $(STAMP_TEST)
	$(PY) -m pytest -q -m slow

# Benchmarks write benchmarks/results/*.json and *.md; each also runs alone (python -m benchmarks.<name>).
BENCHMARKS := bench_pass_speed bench_cost_model bench_realised_speed bench_fidelity bench_factorization \
	bench_latency_budget bench_trained_1d bench_budget bench_shape_propagation bench_rewrite_stages

bench: $(STAMP_TEST)
	@for b in $(BENCHMARKS); do echo "== $$b" >&2; $(PY) -m benchmarks.$$b || exit 1; done

bench-quick: $(STAMP_TEST)
	@for b in $(BENCHMARKS); do echo "== $$b --quick" >&2; $(PY) -m benchmarks.$$b --quick || exit 1; done

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check fxrewrite passes tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
