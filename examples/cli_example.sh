#!/usr/bin/env bash
# The fxrewrite command line, end to end on a torchvision model with random weights.
# Run from the repository root after `make test` (or `make run`) has created .venv:  bash examples/cli_example.sh
set -euo pipefail
FX="${FXREWRITE:-.venv/bin/python -m fxrewrite}"

echo "== the passes and their options"
$FX passes

echo "== dry run: resnet18's convolution sites and their eligibility"
$FX plan torchvision:resnet18 --input-shape 1,3,224,224

echo "== rewrite layer4 with depthwise-separable rank 2, report as Markdown"
$FX rewrite torchvision:resnet18 --input-shape 1,3,224,224 --pass "depthwise-separable{rank=2}" \
    --select "layer4.*" --markdown

echo "== a bad option is a usage error (exit code 2)"
set +e
$FX rewrite torchvision:resnet18 --pass "grouped{groupz=4}"
echo "exit code: $?"
