"""CacheGen codec (arXiv 2310.07240) on SmolLM2-135M: bits per value, bytes on disk against the raw bf16 cache and
against zstd, encode/decode time, and the quality of attending to the *decoded* cache.

* Size and time: a bf16 cache of ``--tokens`` tokens of *Hamlet*, saved with ``kvjax.persist.save_state`` losslessly
  (blosc-zstd arrays) and with ``codec="cachegen"`` (default bins, and a coarser setting); zstd (``zstandard``,
  levels 3 and 19) of the raw bf16 keys/values as the general-purpose baseline. Codec time is the encoder/decoder
  alone over every layer (``kvjax.codec.cachegen``), save/load time the whole ``save_state``/``load_state``.
* Needle prompts: ``--prompts`` niah_single prompts (~1K tokens, depths x seeds, Shakespeare filler). The context
  (all but the last ``--suffix`` tokens, the question and answer prefix) is prefilled into a bf16 cache, stored and
  loaded; the suffix and the answer are then teacher-forced through the loaded cache: answer log-probability (mean
  over prompts) and greedy-exact (every answer token is the argmax), original cache vs decoded cache.
* Perplexity: ``--ppl-context`` tokens of *Hamlet* (another passage) cached, stored and loaded, then the next
  ``--ppl-eval`` tokens scored through the loaded cache.

Usage: nice -n 10 python benchmarks/cachegen_bench.py [--tokens 1024] [--prompts 8] [--out /tmp/kvjax-cachegen]
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np


def codec_configs():
    from kvjax.codec.cachegen import CacheGenConfig

    return {"cachegen (paper/authors' bins)": CacheGenConfig(),
            "cachegen coarse (keys 16/8/8, values 16/8)": CacheGenConfig(key_bins=(16, 8, 8), value_bins=(16, 8))}


def store(state, path, cfg, codec=None, codec_config=None):
    """save + load: (loaded state, meta, save s, load s)."""
    from kvjax.persist import load_state, save_state

    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    meta = save_state(path, state, cfg=cfg, codec=codec, codec_config=codec_config)
    t1 = time.perf_counter()
    loaded = load_state(path, like=state, cfg=cfg)
    jax.block_until_ready(loaded)
    return loaded, meta, t1 - t0, time.perf_counter() - t1


def codec_times(state, config):
    """(encode s, decode s, stream bytes, valid values) of the codec alone over every layer's keys and values."""
    from kvjax.codec import cachegen

    n = len(state.layers)
    enc = dec = 0.0
    size = values = 0
    for i, layer in enumerate(state.layers):
        valid = np.asarray(layer.pos) >= 0
        for kind in ("k", "v"):
            x = np.asarray(getattr(layer, kind))
            t0 = time.perf_counter()
            s = cachegen.encode(x, valid, config.bins(kind, i, n), config)
            t1 = time.perf_counter()
            cachegen.decode(s)
            dec += time.perf_counter() - t1
            enc += t1 - t0
            size += len(s)
            values += int(valid.sum()) * x.shape[-1]
    return enc, dec, size, values


def zstd_bytes(state, level: int) -> int:
    import zstandard

    parts = []
    for layer in state.layers:
        ok = np.asarray(layer.pos) >= 0
        for x in (layer.k, layer.v):
            parts.append(np.asarray(x, jnp.bfloat16)[ok].tobytes())
    return len(zstandard.ZstdCompressor(level=level).compress(b"".join(parts)))


def forced_logprobs(model, params, state, tokens, mask):
    """Log-probabilities ``(B, n - 1)`` of ``tokens[:, 1:]`` teacher-forced through ``state`` (which holds the tokens
    before ``tokens``), and whether each was the argmax."""
    logits, _, _ = model.jit_forward(params, tokens, state, mask, logits="all")
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = tokens[:, 1:]
    lp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return np.asarray(lp), np.asarray(jnp.argmax(logp, -1) == tgt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=8, help="needle prompts (depths 0.2..0.8 x seeds)")
    ap.add_argument("--needle-tokens", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=32, help="prompt tokens fed after loading (question + prefix)")
    ap.add_argument("--ppl-context", type=int, default=1024)
    ap.add_argument("--ppl-eval", type=int, default=256)
    ap.add_argument("--out", default="/tmp/kvjax-cachegen")
    args = ap.parse_args()
    from kvjax.data.corpora import load_text
    from kvjax.eval.harness import prepare_examples
    from kvjax.eval.tasks import sweep
    from kvjax.pretrained import load_pretrained

    lm = load_pretrained("smollm2-135m", progress=False)
    model, params, cfg = lm.model, lm.params, lm.cfg
    bf16 = jnp.bfloat16
    hamlet = lm.tokenizer.encode(load_text("hamlet"))

    # ---------------------------------------------------------------------------------------- size and time
    ids = jnp.asarray([hamlet[5000:5000 + args.tokens]], jnp.int32)
    _, state, _ = model.jit_forward(params, ids, model.init_state(1, args.tokens, bf16), logits="none")
    jax.block_until_ready(state)
    rows = []
    _, meta, ts, tl = store(state, os.path.join(args.out, "lossless"), cfg)
    raw = meta["raw_bf16_bytes"]
    values = raw // 2
    rows.append(("persist lossless (blosc-zstd)", meta["disk_bytes"], 8 * meta["disk_bytes"] / values, "-", "-", ts,
                 tl))
    for level in (3, 19):
        t0 = time.perf_counter()
        zb = zstd_bytes(state, level)
        rows.append((f"zstd level {level} of raw bf16", zb, 8 * zb / values, f"{time.perf_counter() - t0:.2f}", "-",
                     "-", "-"))
    for name, conf in codec_configs().items():
        enc, dec, size, nval = codec_times(state, conf)
        assert nval == values
        _, meta, ts, tl = store(state, os.path.join(args.out, "cg"), cfg, "cachegen", conf)
        rows.append((name, meta["disk_bytes"], 8 * size / values, f"{enc:.2f}", f"{dec:.2f}", ts, tl))
    print(f"\nSmolLM2-135M, {args.tokens} tokens of Hamlet, bf16 cache: raw bf16 {raw:,} bytes "
          f"({values:,} values)\n")
    print("| storage | disk bytes | raw bf16 / disk | bits per value | codec encode s | codec decode s | save s | "
          "load s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, disk, bpv, enc, dec, ts, tl in rows:
        fmt = lambda v: v if isinstance(v, str) else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {disk:,} | {raw / disk:.2f}x | {bpv:.2f} | {enc} | {dec} | {fmt(ts)} | {fmt(tl)} |")

    # ---------------------------------------------------------------------------------------- needle prompts
    depths = (0.2, 0.4, 0.6, 0.8)
    seeds = tuple(range(-(-args.prompts // len(depths))))
    examples = sweep("niah_single", (args.needle_tokens,), depths, seeds, lambda s: len(lm.tokenizer.encode(s)),
                     filler="shakespeare")[:args.prompts]
    prep = prepare_examples(lm, examples, lm.prompt_style)
    tokens = jnp.asarray(np.stack([p.tokens for p in prep]))
    mask = jnp.asarray(np.stack([p.mask for p in prep]))
    answers = np.stack([p.answer_ids for p in prep])
    amask = np.stack([p.answer_mask for p in prep])
    s = args.suffix
    ctx_len = tokens.shape[1] - s
    room = s + answers.shape[1]
    _, nstate, _ = model.jit_forward(params, tokens[:, :ctx_len], model.init_state(len(prep), tokens.shape[1] + room,
                                                                                 bf16), mask[:, :ctx_len],
                                  logits="none")
    tail = jnp.concatenate([tokens[:, ctx_len:], jnp.asarray(answers)], axis=1)
    tail_mask = jnp.concatenate([mask[:, ctx_len:], jnp.asarray(amask)], axis=1)
    sel = np.concatenate([np.zeros((len(prep), s - 1), bool), amask], axis=1)  # log-probs of the answer tokens

    def needle_quality(st):
        lp, hit = forced_logprobs(model, params, st, tail, tail_mask)
        return np.where(sel, lp, 0).sum(1), np.all(np.where(sel, hit, True), axis=1)

    # ---------------------------------------------------------------------------------------- perplexity
    seg = jnp.asarray([hamlet[20000:20000 + args.ppl_context + args.ppl_eval]], jnp.int32)
    _, pstate, _ = model.jit_forward(params, seg[:, :args.ppl_context - 1],  # the last context token: fed after
                                  model.init_state(1, args.ppl_context + args.ppl_eval, bf16), logits="none")

    def ppl(st):
        lp, _ = forced_logprobs(model, params, st, seg[:, args.ppl_context - 1:], None)
        return float(np.exp(-lp.mean()))

    used = sorted({(round(e.meta.get("depth", e.depth), 2), e.seed) for e in examples}) if hasattr(
        examples[0], "meta") else "?"
    print(f"\nQuality through the loaded cache: {len(prep)} niah_single prompts (~{args.needle_tokens} tokens, "
          f"(depth, seed) {used}; the last {s} prompt tokens and the answer fed after loading), perplexity "
          f"of {args.ppl_eval} Hamlet tokens after {args.ppl_context} cached ones\n")
    print("| cache loaded from | needle answer log-prob (mean) | greedy-exact answers | perplexity | needle cache "
          "bits per value |")
    print("|---|---|---|---|---|")
    variants = [("lossless (original bf16 cache)", None, None)] + [(n, "cachegen", c) for n, c in
                                                                   codec_configs().items()]
    for name, codec, conf in variants:
        loaded, meta, _, _ = store(nstate, os.path.join(args.out, "needle"), cfg, codec, conf)
        lp, hit = needle_quality(loaded)
        bpv = 8 * sum(a.get("stored_shape", [0])[0] for a in meta["arrays"] if a.get("codec")) / (
            meta["raw_bf16_bytes"] / 2) if codec else 16.0
        ploaded, _, _, _ = store(pstate, os.path.join(args.out, "ppl"), cfg, codec, conf)
        print(f"| {name} | {lp.mean():.3f} | {int(hit.sum())}/{len(hit)} | {ppl(ploaded):.3f} | {bpv:.2f} |")


if __name__ == "__main__":
    main()
