"""Every entry point that writes to the cache refuses a state without room (issue 17, item 5), and a model whose
output layer is untied never falls back to the transposed embedding (item 6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generate import generate

from conftest import tiny_llama_with_prompt

T = 12


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    model, params, prompt = tiny_llama_with_prompt(tmp_path_factory, T)
    _, state = model.jit_prefill(params, prompt, model.init_state(2, T), logits="none")  # every slot used
    return model, params, prompt, state


def test_decode_step_on_a_full_state_is_refused_jitted_or_not(full):
    """Regression: decode_step on a full state dropped the new token's keys and values and returned wrong logits."""
    model, params, prompt, state = full
    tok = prompt[:, -1]
    for step in (model.decode_step, model.jit_decode_step):
        with pytest.raises(ValueError, match=f"positions past capacity: layer 0 holds {T} slots, {T} are used"):
            step(params, tok, state)


def test_prefill_and_generate_on_a_full_state_are_refused(full):
    model, params, prompt, state = full
    for fn in (model.prefill, model.jit_prefill):
        with pytest.raises(ValueError, match="positions past capacity"):
            fn(params, prompt[:, :3], state)
    with pytest.raises(ValueError, match="positions past capacity"):
        generate(model, params, prompt[:, :3], state=state, max_new_tokens=2)


def test_decode_step_inside_a_callers_jit_marks_the_rows_that_did_not_fit(full):
    """Inside a caller's jit the fill is not known before running: the overflowing rows come out NaN, never as
    plausible logits computed without the new token."""
    model, params, prompt, state = full
    logits, _ = jax.jit(model.decode_step)(params, prompt[:, -1], state)
    assert np.isnan(np.asarray(logits)).all()
    roomy = model.init_state(2, T + 1)
    _, roomy = model.jit_prefill(params, prompt, roomy, logits="none")
    ok, _ = jax.jit(model.decode_step)(params, prompt[:, -1], roomy)
    want, _ = model.decode_step(params, prompt[:, -1], roomy)
    np.testing.assert_allclose(np.asarray(ok), np.asarray(want), atol=1e-5)


def test_untied_model_without_lm_head_is_an_error(full):
    """Regression: params without lm_head on an untied model silently used the transposed embedding."""
    model, params, prompt, _ = full
    assert not model.cfg.tie_word_embeddings and "lm_head" in params
    bad = {k: v for k, v in params.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="no 'lm_head' weight .*tie_word_embeddings=False"):
        model.prefill(bad, prompt, model.init_state(2, T))
    with pytest.raises(ValueError, match="no 'lm_head' weight"):
        model.jit_prefill(bad, prompt, model.init_state(2, T))


def test_generate_refuses_a_method_that_leaves_no_decode_room(full, monkeypatch):
    """The decode loop cannot check room inside its compiled loop, so generate checks the compressed state first."""
    from kvjax.compress import get_method
    from kvjax.compress.base import Context

    model, params, prompt, _ = full
    method = get_method("snapkv", budget=9, window=3)  # (a setting no other test traces)
    real = type(method).prefill

    def stingy(self, state, obs, ctx):  # a method that ignores ctx.decode_room
        return real(self, state, obs, Context(cfg=ctx.cfg, decode_room=0, params=ctx.params, prompt_len=ctx.prompt_len))

    monkeypatch.setattr(type(method), "prefill", stingy)
    with pytest.raises(ValueError, match=r"positions past capacity.*\[after snapkv\(.*for 3 new tokens\]"):
        generate(model, params, prompt, max_new_tokens=3, method=method)
