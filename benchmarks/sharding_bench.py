"""Per-device bytes of params and KV state, and decode step time, on 1/2/4/8 devices (fake CPU devices by default).

    python benchmarks/sharding_bench.py --devices 1,2,4,8 --capacity 8192 [--out docs/results/sharding_bench.md]

Bytes are exact: the sum of ``shard.data.nbytes`` over each array's addressable shards on the most loaded device
(:func:`kvjax.sharding.max_device_nbytes`). The model is a Llama-shaped random model with 8 KV heads (so that
``model`` can split heads 8 ways; SmolLM2 has 3). On fake CPU devices all "devices" share the same cores, so step
times show that the partitioned programs run, not a speed-up. On a machine with accelerators pass
``--fake_devices 0`` to use the real ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--capacity", type=int, default=8192, help="KV slots per layer")
    ap.add_argument("--prompt", type=int, default=256, help="tokens prefilled before timing decode steps")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--fake_devices", type=int, default=8, help="fake CPU devices (0 = the real devices)")
    ap.add_argument("--impl", default="reference", choices=["reference", "pallas"])
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={a.fake_devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax import nbytes, sharding
    from kvjax.config import ModelConfig
    from kvjax.model import Model

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=4096, hidden_size=512, intermediate_size=1536,
                      num_layers=a.layers, num_heads=8, num_kv_heads=8, head_dim=64,
                      max_position_embeddings=max(a.capacity, 8192)).validate()
    rng = np.random.default_rng(0)

    def w(*s):
        return jnp.asarray(rng.normal(0, 0.02, s), jnp.float32)

    d, f, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    params = {"embed": w(cfg.vocab_size, d), "norm": jnp.ones(d), "lm_head": w(d, cfg.vocab_size),
              "layers": tuple(dict(attn_norm=jnp.ones(d), q=w(d, q), k=w(d, q), v=w(d, q), o=w(q, d),
                                   mlp_norm=jnp.ones(d), gate=w(d, f), up=w(d, f), down=w(f, d))
                              for _ in range(cfg.num_layers))}
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, a.prompt)), jnp.int32)
    plat = jax.devices()[0].platform
    rows = []
    ref_logits = None
    for n in [int(x) for x in a.devices.split(",")]:
        if n > jax.device_count():
            print(f"skipping {n} devices: only {jax.device_count()} exist", file=sys.stderr)
            continue
        for spec in ([f"model:{n}", f"sequence:{n}"] if n > 1 else ["model:1"]):
            mesh = sharding.make_mesh(spec)
            model = Model(cfg, impl=a.impl, mesh=mesh)
            sp = model.shard_params(params)
            st = model.init_state(1, a.capacity)
            lg, st = model.jit_prefill(sp, tokens, st, logits="last")
            tok = jnp.argmax(lg, -1)
            lg1, st1 = model.jit_decode_step(sp, tok, st)  # compile
            jax.block_until_ready(lg1)
            t0 = time.perf_counter()
            s = st
            for _ in range(a.steps):
                lg1, s = model.jit_decode_step(sp, tok, s)
            jax.block_until_ready(lg1)
            dt = (time.perf_counter() - t0) / a.steps
            if ref_logits is None:
                ref_logits = np.asarray(lg1)
            err = float(np.max(np.abs(np.asarray(lg1) - ref_logits)))
            rows.append(dict(devices=n, mesh=spec, params_total=nbytes(sp), params_dev=sharding.max_device_nbytes(sp),
                             kv_total=nbytes(st), kv_dev=sharding.max_device_nbytes(st), step_ms=dt * 1e3, err=err))
            print(rows[-1], flush=True)
    mb = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
    lines = [f"Platform: {plat} ({'fake devices' if a.fake_devices else 'real devices'}), impl={a.impl}; model: "
             f"{cfg.num_layers} layers, d={cfg.hidden_size}, 8 heads / 8 KV heads x 64, vocab {cfg.vocab_size}; "
             f"KV state: batch 1 x {a.capacity} slots (f32).", "",
             "| devices | mesh | params MiB per device (total) | KV state MiB per device (total) | decode step ms | "
             "max logit diff vs 1 device |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | `{r['mesh']}` | {mb(r['params_dev'])} ({mb(r['params_total'])}) | "
                     f"{mb(r['kv_dev'])} ({mb(r['kv_total'])}) | {r['step_ms']:.1f} | {r['err']:.1e} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
