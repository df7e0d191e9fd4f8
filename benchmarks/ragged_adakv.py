"""AdaKV with padded vs ragged per-head storage at the same kept tokens, on the real model.

For each budget: one prompt of ``--tokens`` Shakespeare tokens is prefilled once, compressed by Ada-KV
(``storage="padded"``: a ``DenseKV`` of the largest head's count per layer; ``storage="ragged"``: a ``RaggedKV`` flat
buffer per row with per-head offsets), then ``--new`` tokens are decoded greedily in the jitted decode loop (compiled
ahead, median of ``--repeats`` timed runs). Reported: kept tokens (valid slots; identical by construction),
``kvjax.nbytes`` of the state after compression (the allocated cache: kept tokens + decode room + bookkeeping),
bytes of the valid tokens alone, decode tokens/s, and whether both decodes produce the same tokens.

    python benchmarks/ragged_adakv.py --model smollm2-135m --tokens 1024 --budgets 64,128,256 --new 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def valid_token_bytes(state) -> int:
    """Bytes of the valid (kept or decoded) tokens' keys, values and positions, summed over layers."""
    from kvjax.state import as_dense_layer  # noqa: PLC0415

    total = 0
    for layer in state.layers:
        d = as_dense_layer(layer)
        per = d.k.shape[-1] * d.k.dtype.itemsize + d.v.shape[-1] * d.v.dtype.itemsize + 4
        total += int(jnp.sum(d.pos >= 0)) * per
    return total


def decode_timed(lm, logits, state, new: int, repeats: int):
    from kvjax.generate import SamplingConfig, decode_loop, loop_params  # noqa: PLC0415

    # (the weights stacked once outside the timed call: the padded and full caches run the scanned loop, which would
    # otherwise copy them on every call, the ragged cache the unrolled one, which does not)
    params = jax.block_until_ready(loop_params(lm.model, lm.params, state))
    args = (lm.model, params, logits, state, jax.random.PRNGKey(0), new, SamplingConfig(), ())
    decode_loop.lower(*args).compile()  # fills the call cache: the timed calls do not compile
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(decode_loop(*args))
        times.append(time.perf_counter() - t0)
    return out, new / statistics.median(times)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/results/ragged_adakv.json")
    args = ap.parse_args(argv)
    from kvjax.compress import get_method  # noqa: PLC0415
    from kvjax.data.corpora import load_text  # noqa: PLC0415
    from kvjax.generate import compress_prefilled  # noqa: PLC0415
    from kvjax.compress.base import Context  # noqa: PLC0415
    from kvjax.pretrained import load_pretrained  # noqa: PLC0415
    from kvjax.state import nbytes  # noqa: PLC0415

    lm = load_pretrained(args.model, progress=False)
    ids = jnp.asarray([lm.tokenizer.encode(load_text("hamlet"))[5000:5000 + args.tokens]], jnp.int32)
    t = ids.shape[1]
    probe = get_method("adakv")
    state0 = lm.model.init_state(1, t)
    logits, state0, obs = lm.model.jit_forward(lm.params, ids, state0, None, observe=probe.observe(), logits="last")
    full = lm.model.init_state(1, t + args.new)
    full_logits, full, _ = lm.model.jit_forward(lm.params, ids, full, None, logits="last")
    _, full_speed = decode_timed(lm, full_logits, full, args.new, args.repeats)
    rows = [dict(storage="full", budget=t, bytes=nbytes(full), valid_bytes=valid_token_bytes(full),
                 tok_s=full_speed, same_tokens="")]
    print(f"full: {nbytes(full)} bytes, {full_speed:.1f} tok/s", flush=True)
    ctx = Context(cfg=lm.model.cfg, decode_room=args.new, prompt_len=t)
    for budget in [int(x) for x in args.budgets.split(",")]:
        outs = {}
        for storage in ("padded", "ragged"):
            m = get_method("adakv", budget=budget, storage=storage)
            st = compress_prefilled(m, state0, obs, ctx)
            out, speed = decode_timed(lm, logits, st, args.new, args.repeats)
            outs[storage] = np.asarray(out[0])
            kept = sum(int(jnp.sum(layer.pos >= 0)) for layer in st.layers)
            rows.append(dict(storage=storage, budget=budget, kept_tokens=kept, bytes=nbytes(st),
                             valid_bytes=valid_token_bytes(st), tok_s=speed,
                             layer_class=type(st.layers[0]).__name__))
            print(rows[-1], flush=True)
        same = bool((outs["padded"] == outs["ragged"]).all())
        rows[-1]["same_tokens"] = rows[-2]["same_tokens"] = same
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(args=vars(args), device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
    os.replace(tmp, args.out)
    fb = rows[0]["bytes"]
    print("\n| storage | budget | kept tokens (all layers) | state bytes (MiB) | vs full | valid-token bytes (MiB) | "
          "allocated / valid | decode tok/s | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['storage']} | {r['budget']} | {r.get('kept_tokens', '')} | {r['bytes'] / 2**20:.2f} | "
              f"{fb / r['bytes']:.2f}x | {r['valid_bytes'] / 2**20:.2f} | {r['bytes'] / r['valid_bytes']:.2f} | "
              f"{r['tok_s']:.1f} | {r['same_tokens']} |")
    return rows


if __name__ == "__main__":
    main()
