"""The embedded SmolLM2-135M: kvjax matches transformers' GGUF loading on real text and answers a question."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm():
    from kvjax.pretrained import load_pretrained

    try:
        return load_pretrained("smollm2-135m", progress=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_logits_match_transformers_on_real_text(lm):
    import torch
    from transformers import AutoModelForCausalLM

    from kvjax.checkpoints.gguf import smollm2_gguf_path
    from kvjax.data.corpora import load_text

    ids = np.asarray(lm.tokenizer.encode(load_text("hamlet"))[1000:1128], np.int32)
    ours, _ = lm.model.jit_prefill(lm.params, jnp.asarray(ids[None]), lm.model.init_state(1, len(ids)))
    d, name = os.path.split(smollm2_gguf_path())
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
    assert np.abs(np.asarray(ours[0]) - ref).max() < 1e-3


def test_answers_a_chat_question(lm):
    from kvjax.generate import generate

    tok = lm.tokenizer
    prompt = jnp.asarray([tok.encode(lm.chat_prefix("What is the capital of France?"))], jnp.int32)
    out = generate(lm.model, lm.params, prompt, max_new_tokens=12, stop_tokens=tuple(tok.eos_ids))
    text = tok.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist(), skip_special_tokens=True)
    assert "Paris" in text
