"""CacheGen-style persistence on the real model: bytes on disk vs raw bf16, load time vs prefill time, and that
generation resumed from the loaded state equals generation without the save.

Usage: python benchmarks/persist_bench.py [--tokens 1024] [--out /tmp/kvjax-persist]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="/tmp/kvjax-persist")
    args = ap.parse_args()
    from kvjax.compress import get_method
    from kvjax.data.corpora import load_text
    from kvjax.generate import SamplingConfig, decode_loop, prefill_compressed
    from kvjax.persist import load_state, save_state
    from kvjax.pretrained import load_pretrained
    from kvjax.state import nbytes

    lm = load_pretrained("smollm2-135m", progress=False)
    ids = jnp.asarray([lm.tokenizer.encode(load_text("hamlet"))[5000:5000 + args.tokens]], jnp.int32)
    print(f"| cache | state bytes | raw bf16 bytes | disk bytes | disk vs raw bf16 | save s | load s | prefill s | "
          f"load / prefill | resumed tokens equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, method in [("full f32", None), ("kivi-2", get_method("kivi", bits=2)),
                         ("snapkv-256 + kivi-2", None)]:
        if name.startswith("snapkv"):
            from kvjax.compress import chain

            method = chain(get_method("snapkv", budget=256), get_method("kivi", bits=2))
        times = []
        for _ in range(2):  # second run timed (first compiles)
            t0 = time.perf_counter()
            logits, state = prefill_compressed(lm.model, lm.params, ids, method=method, decode_room=16)
            jax.block_until_ready((logits, state))
            times.append(time.perf_counter() - t0)
        path = os.path.join(args.out, name.replace(" ", "_"))
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        meta = save_state(path, state, cfg=lm.cfg, method=method.describe() if method else "full")
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_state(path, like=state, cfg=lm.cfg)
        jax.block_until_ready(loaded)
        t_load = time.perf_counter() - t0
        run = lambda st: decode_loop(lm.model, lm.params, logits, st, jax.random.PRNGKey(0), 16, SamplingConfig(),
                                     (), None, None)[0]
        same = bool(np.array_equal(np.asarray(run(state)), np.asarray(run(loaded))))
        print(f"| {name} | {nbytes(state):,} | {meta['raw_bf16_bytes']:,} | {meta['disk_bytes']:,} | "
              f"{meta['raw_bf16_bytes'] / meta['disk_bytes']:.2f}x | {t_save:.2f} | {t_load:.2f} | {times[1]:.2f} | "
              f"{t_load / times[1]:.2f} | {same} |")


if __name__ == "__main__":
    main()
