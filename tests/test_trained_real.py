"""The four trainings of the README's trained-compressor tables, run from their configs on the real embedded models
(``slow``: 1-8 minutes each on an idle 2-core CPU, 30 at the most): each finishes within the issue's 30-minute bound,
improves on its held-out split, and reproduces the artefact the README's tables were measured with (the committed
DuoAttention gates; the held-out overlap the README gives for the Locret heads, which are not committed).

    pytest -m slow tests/test_trained_real.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvjax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 30 * 60


def train(name: str, tmp_path) -> tuple[dict, str]:
    from kvjax.train.run import read_metrics, run_training  # noqa: PLC0415

    c = configs.config_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config()
    c.run_dir = str(tmp_path / name)
    summary = run_training(c, progress=False)
    assert summary["steps"] == c.train.steps and summary["resumed_from"] == 0
    assert sum(r["step_s"] for r in read_metrics(os.path.join(c.run_dir, "metrics.jsonl"))
               if r.get("split") == "train") < LIMIT_S
    for f in ("metrics.jsonl", "loss_curve.png", "summary.json"):
        assert os.path.getsize(os.path.join(c.run_dir, f)) > 0
    return summary, c.run_dir


def heldout(run_dir: str) -> list[dict]:
    from kvjax.train.run import read_metrics  # noqa: PLC0415

    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "heldout"]


@pytest.mark.slow
@pytest.mark.parametrize("name,overlap", [("locret_train", 0.352), ("locret_train_gemma", 0.294)])
def test_locret_training_reproduces_the_readme_heads(name, overlap, tmp_path):
    summary, run_dir = train(name, tmp_path)
    rows = heldout(run_dir)
    assert [r["step"] for r in rows] == [100, 200, 300]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["top10_overlap"] > rows[0]["top10_overlap"] > 0.15  # a random scorer: ~0.10
    assert rows[-1]["top10_overlap"] == pytest.approx(overlap, abs=0.03)  # the README's training table
    assert os.path.isdir(os.path.join(run_dir, "ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("name,committed", [("duo_train", "duo_smollm2_gates"), ("duo_train_gemma", "duo_gemma3_gates")])
def test_duo_training_reproduces_the_committed_gates(name, committed, tmp_path):
    from kvjax.compress.duo_attention import load_gates  # noqa: PLC0415

    summary, run_dir = train(name, tmp_path)
    got = load_gates(os.path.join(run_dir, "ckpt")).values
    want = load_gates(os.path.join(ROOT, "docs", "results", committed)).values
    np.testing.assert_allclose(got, want, atol=5e-3)  # measured: equal to 1e-4 between two runs
    trained = got[got < 1.0]
    assert trained.size and trained.min() < 0.9  # the L1 term moved gates; their ranking is what deploys
    assert os.path.getsize(os.path.join(run_dir, "gates.png")) > 1000
