"""Config fields mean what they mean in transformers (issue 17, item 8): Qwen2's sliding window follows
``use_sliding_window`` / ``max_window_layers`` / ``layer_types`` exactly; layer_types kvjax cannot honour are refused."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kvjax.config import UnsupportedConfigError, config_from_hf

from conftest import TINY, make_hf_model

N = 4
CASES = {  # name: Qwen2Config overrides
    "all": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
    "none_flag_off": dict(use_sliding_window=False, sliding_window=5, max_window_layers=0),
    "none_all_below": dict(use_sliding_window=True, sliding_window=5, max_window_layers=N),
    "some": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "layer_types": dict(use_sliding_window=True, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "defaults": dict(use_sliding_window=True),  # sliding_window 4096, max_window_layers 28 (> N: no window)
}


def _hf_windows(hf_cfg) -> list[int]:
    """Per-layer window as transformers' Qwen2 attention uses it (0 = full attention)."""
    return [(hf_cfg.sliding_window or 0) if t == "sliding_attention" else 0 for t in hf_cfg.layer_types]


@pytest.mark.parametrize("case", list(CASES))
def test_qwen2_sliding_layers_match_transformers(case):
    """Regression: the window landed on the layers below max_window_layers (inverted) without a word."""
    hf_cfg = transformers.Qwen2Config(**{**TINY, "num_hidden_layers": N, **CASES[case]})
    cfg = config_from_hf(hf_cfg.to_dict())
    assert [cfg.layer_window(i) for i in range(N)] == _hf_windows(hf_cfg)


def test_qwen2_window_on_some_layers_logits_match_transformers(tmp_path_factory):
    from kvjax.checkpoints.safetensors import load_safetensors
    from kvjax import Model

    hf, path = make_hf_model("qwen2", tmp_path_factory, num_hidden_layers=3, use_sliding_window=True,
                             sliding_window=4, max_window_layers=1)
    cfg, params = load_safetensors(path, progress=False)
    assert [cfg.layer_window(i) for i in range(3)] == [0, 4, 4]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 14)).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    model = Model(cfg)
    got, _ = model.prefill(params, jnp.asarray(tokens), model.init_state(1, 16))
    assert np.abs(np.asarray(got) - want).max() < 1e-4


@pytest.mark.parametrize("arch, extra, message", [
    ("MistralConfig", dict(sliding_window=5, layer_types=["full_attention"] * 2), "transformers' Mistral ignores"),
    ("LlamaConfig", dict(layer_types=["sliding_attention", "full_attention"]), "no sliding-window layers"),
    ("Qwen2Config", dict(use_sliding_window=False, layer_types=["sliding_attention"] * 2), "no sliding window is act"),
    ("Qwen2Config", dict(layer_types=["chunked_attention"] * 2), "not supported"),
])
def test_layer_types_kvjax_cannot_honour_are_refused(arch, extra, message):
    raw = getattr(transformers, arch)(**{**TINY, **extra}).to_dict()
    raw["layer_types"] = extra["layer_types"]  # (Mistral/Llama configs do not keep it as a field)
    with pytest.raises(UnsupportedConfigError, match=message):
        config_from_hf(raw)


def test_layer_types_that_agree_with_transformers_are_accepted():
    raw = transformers.MistralConfig(**{**TINY, "sliding_window": 5}).to_dict()
    raw["layer_types"] = ["sliding_attention"] * 2
    assert [config_from_hf(raw).layer_window(i) for i in range(2)] == [5, 5]
    raw = transformers.LlamaConfig(**TINY).to_dict()
    raw["layer_types"] = ["full_attention"] * 2
    assert config_from_hf(raw).layer_window(0) == 0
