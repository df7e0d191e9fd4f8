"""Benchmarks of the kvjax Pallas kernels against their jnp references (and against themselves on the full cache).

For every kernel, context ``C`` and batch ``B`` it times (jitted, median of ``--repeats`` runs of ``--iters`` calls):

* ``pallas`` — the kernel with ragged per-head ``lengths`` (mean ``--budget * C`` slots per head: an evicted cache);
* ``pallas_full`` — the same kernel over the whole cache (no ``lengths``);
* ``reference`` — the jnp reference (same ragged inputs; it reads the whole cache);
* for the quantized kernel also ``dense_full`` — the dense decode kernel over a bf16/f32 cache of the same shape;
* for the ragged kernel (``ragged_decode_attention``: the same per-head lengths stored in one flat buffer per row,
  no padding) ``pallas`` is the ragged kernel, ``padded`` the dense kernel with ``lengths`` over the padded cache
  holding the same tokens (every head padded to the largest), ``reference`` the ragged jnp reference.

Reported per row: the bytes the variant must read (payload of the slots it may attend to: K, V, scales, positions),
time, achieved bandwidth (bytes / time) and its fraction of the device's measured copy bandwidth (``x + 1`` over a
large buffer: 2 x bytes / time), plus the speed-up over the reference. Prefill rows also give TFLOP/s.

Writes ``<out>.csv`` and ``<out>.md``. ``--smoke`` runs tiny shapes (interpret mode on a CPU) in seconds.

    python benchmarks/bench_kernels.py --contexts 4096,16384,65536,131072 --batches 1,8,32 --out bench
    python benchmarks/bench_kernels.py --smoke
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import decode_attention, prefill_attention_with_scores, quantized_decode_attention  # noqa: E402
from pallas_kernels import ragged_decode_attention  # noqa: E402
from pallas_kernels import reference  # noqa: E402

COLUMNS = ["kernel", "variant", "batch", "context", "hq", "hkv", "head_dim", "dtype", "tq", "bits", "mean_len",
           "bytes", "time_ms", "GB_s", "pct_copy_bw", "TFLOP_s", "speedup_vs_ref", "error"]


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def timeit(fn, *args, iters: int, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call of a jitted ``fn`` (``iters`` back-to-back async calls per sample)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int, iters: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s: ``x + 1`` reads and writes ``nbytes``."""
    n = max(1, nbytes // 4)
    x = jnp.zeros((n,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t = timeit(f, x, iters=iters, repeats=repeats)
    return 2 * n * 4 / t


def mem_limit_bytes(arg_gb: float | None) -> float:
    if arg_gb:
        return arg_gb * 2 ** 30
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return 0.7 * stats["bytes_limit"]
    except Exception:  # noqa: BLE001 (CPU backends may not report)
        pass
    return 16 * 2 ** 30


def ragged_lengths(rng, b, hkv, c, budget):
    """Per-head lengths with mean ~``budget * c`` (uniform in [1, 2 * budget * c], clipped to c)."""
    hi = max(2, int(2 * budget * c))
    return np.minimum(rng.integers(1, hi + 1, size=(b, hkv)), c).astype(np.int32)


def dense_inputs(key, b, hkv, g, c, d, tq, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, hkv * g, tq, d), dtype)
    k = jax.random.normal(kk, (b, hkv, c, d), dtype)
    v = jax.random.normal(kv, (b, hkv, c, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, hkv, c))
    q_pos = jnp.broadcast_to(c - tq + jnp.arange(tq, dtype=jnp.int32), (b, tq))
    return q, k, v, pos, q_pos


def quant_inputs(key, b, hkv, c, d, bits, group, r, dtype, res_dtype):
    ks = jax.random.split(key, 6)
    w = d * bits // 8
    kc = jax.random.randint(ks[0], (b, hkv, c, w), 0, 256, jnp.int32).astype(jnp.uint8)
    vc = jax.random.randint(ks[1], (b, hkv, c, w), 0, 256, jnp.int32).astype(jnp.uint8)
    kscale = jax.random.uniform(ks[2], (b, hkv, c // group, d), jnp.float32, 0.01, 0.1).astype(dtype)
    kzero = jax.random.normal(ks[3], (b, hkv, c // group, d), jnp.float32).astype(dtype)
    vscale = jax.random.uniform(ks[4], (b, hkv, c, d // group), jnp.float32, 0.01, 0.1).astype(dtype)
    vzero = jax.random.normal(ks[5], (b, hkv, c, d // group), jnp.float32).astype(dtype)
    k_res = jax.random.normal(ks[0], (b, hkv, r, d), res_dtype) if r else None
    v_res = jax.random.normal(ks[1], (b, hkv, r, d), res_dtype) if r else None
    res_pos = jnp.broadcast_to(c + jnp.arange(r, dtype=jnp.int32), (b, hkv, r)) if r else None
    return (kc, kscale, kzero, vc, vscale, vzero), (k_res, v_res, res_pos)


class Runner:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.interpret = True if args.smoke else None
        self.mem_limit = mem_limit_bytes(args.mem_limit_gb)
        self.copy_bw = None

    def measure_copy(self):
        nbytes = (1 << 20) if self.args.smoke else int(min(self.mem_limit / 4, 2 * 2 ** 30))
        self.copy_bw = copy_bandwidth(nbytes, self.args.iters, self.args.repeats)
        print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), measured copy bandwidth "
              f"{self.copy_bw / 1e9:.1f} GB/s", flush=True)

    def record(self, base: dict, variant: str, fn, fn_args, nbytes: float, flops: float = 0.0):
        if self.args.smoke and variant in ("pallas_full", "dense_full"):
            return None  # same code paths as "pallas": keep the smoke run short
        row = dict(base, variant=variant, bytes=int(nbytes), time_ms="", GB_s="", pct_copy_bw="", TFLOP_s="",
                   speedup_vs_ref="", error="")
        try:
            t = timeit(fn, *fn_args, iters=self.args.iters, repeats=self.args.repeats)
            row.update(time_ms=f"{t * 1e3:.4f}", GB_s=f"{nbytes / t / 1e9:.2f}",
                       pct_copy_bw=f"{100 * nbytes / t / self.copy_bw:.1f}",
                       TFLOP_s=f"{flops / t / 1e12:.2f}" if flops else "")
        except Exception as e:  # noqa: BLE001 (keep benchmarking the other configurations)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if self.args.verbose:
                traceback.print_exc()
        self.rows.append(row)
        print("  " + " ".join(f"{k}={row[k]}" for k in ("kernel", "variant", "batch", "context", "time_ms", "GB_s",
                                                        "pct_copy_bw", "error") if row[k] != ""), flush=True)
        return row

    def finish_group(self, group: list[dict | None]):
        group = [r for r in group if r is not None]
        ref = [r for r in group if r["variant"] == "reference" and r["time_ms"]]
        if ref:
            t_ref = float(ref[0]["time_ms"])
            for r in group:
                if r["time_ms"]:
                    r["speedup_vs_ref"] = f"{t_ref / float(r['time_ms']):.2f}"

    # ------------------------------------------------------------------------------------------------------------
    def bench_decode(self, b, c):
        a = self.args
        dtype = jnp.dtype(a.dtype)
        hkv, g, d, tq = a.kv_heads, a.heads // a.kv_heads, a.head_dim, a.decode_tq
        cache_bytes = 2 * b * hkv * c * d * dtype.itemsize
        if cache_bytes * 1.3 + 4 * b * a.heads * tq * c * 3 > self.mem_limit:
            print(f"  skip decode B={b} C={c}: exceeds the memory limit", flush=True)
            return
        q, k, v, pos, q_pos = dense_inputs(jax.random.PRNGKey(0), b, hkv, g, c, d, tq, dtype)
        lens_np = ragged_lengths(np.random.default_rng(0), b, hkv, c, a.budget)
        lengths = jnp.asarray(lens_np)
        per_slot = 2 * d * dtype.itemsize + 4
        base = dict(kernel="decode_attention", batch=b, context=c, hq=a.heads, hkv=hkv, head_dim=d,
                    dtype=dtype.name, tq=tq, bits="", mean_len=f"{lens_np.mean():.0f}")
        kern = jax.jit(lambda q, k, v, p, qp, L: decode_attention(q, k, v, p, qp, lengths=L, interpret=self.interpret))
        full = jax.jit(lambda q, k, v, p, qp: decode_attention(q, k, v, p, qp, interpret=self.interpret))
        ref = jax.jit(lambda q, k, v, p, qp, L: reference.decode_attention_reference(q, k, v, p, qp, lengths=L))
        group = [self.record(base, "pallas", kern, (q, k, v, pos, q_pos, lengths), lens_np.sum() * per_slot),
                 self.record(base, "pallas_full", full, (q, k, v, pos, q_pos), b * hkv * c * per_slot),
                 self.record(base, "reference", ref, (q, k, v, pos, q_pos, lengths), lens_np.sum() * per_slot)]
        self.finish_group(group)

    def bench_ragged(self, b, c):
        a = self.args
        dtype = jnp.dtype(a.dtype)
        hkv, g, d, tq = a.kv_heads, a.heads // a.kv_heads, a.head_dim, a.decode_tq
        lens_np = ragged_lengths(np.random.default_rng(4), b, hkv, c, a.budget)
        cmax = int(lens_np.max())
        n = int(lens_np.sum(axis=1).max())
        if 2 * b * (n + hkv * cmax) * d * dtype.itemsize * 1.3 > self.mem_limit:
            print(f"  skip ragged B={b} C={c}: exceeds the memory limit", flush=True)
            return
        q, k, v, pos, q_pos = dense_inputs(jax.random.PRNGKey(5), b, hkv, g, cmax, d, tq, dtype)
        q_pos = jnp.full((b, tq), c, jnp.int32)
        starts_np = np.concatenate([np.zeros((b, 1), np.int32), np.cumsum(lens_np, 1)[:, :-1]], 1).astype(np.int32)
        j = np.arange(n)[None, :]
        head = (j[:, None, :] >= np.cumsum(lens_np, 1)[:, :, None]).sum(1)  # (B, N)
        flat_pos = np.where(head < hkv, j - np.take_along_axis(starts_np, np.minimum(head, hkv - 1), 1), -1)
        kf = jax.random.normal(jax.random.PRNGKey(6), (b, n, d), dtype)
        vf = jax.random.normal(jax.random.PRNGKey(7), (b, n, d), dtype)
        fpos, starts, lengths = (jnp.asarray(x.astype(np.int32)) for x in (flat_pos, starts_np, lens_np))
        per_slot = 2 * d * dtype.itemsize + 4
        base = dict(kernel="ragged_decode_attention", batch=b, context=c, hq=a.heads, hkv=hkv, head_dim=d,
                    dtype=dtype.name, tq=tq, bits="", mean_len=f"{lens_np.mean():.0f}")
        kern = jax.jit(lambda q, k, v, p, qp, s, L: ragged_decode_attention(q, k, v, p, qp, s, L, max_len=cmax,
                                                                             interpret=self.interpret))
        padded = jax.jit(lambda q, k, v, p, qp, L: decode_attention(q, k, v, p, qp, lengths=L,
                                                                    interpret=self.interpret))
        ref = jax.jit(lambda q, k, v, p, qp, s, L: reference.ragged_decode_attention_reference(q, k, v, p, qp, s, L))
        group = [self.record(base, "pallas", kern, (q, kf, vf, fpos, q_pos, starts, lengths), lens_np.sum() * per_slot),
                 self.record(base, "padded", padded, (q, k, v, pos, q_pos, lengths), lens_np.sum() * per_slot),
                 self.record(base, "reference", ref, (q, kf, vf, fpos, q_pos, starts, lengths),
                             hkv * b * n * per_slot)]
        self.finish_group(group)

    def bench_quantized(self, b, c):
        a = self.args
        dtype = jnp.dtype(a.dtype)
        hkv, g, d, tq = a.kv_heads, a.heads // a.kv_heads, a.head_dim, a.decode_tq
        bits, gr, r = a.bits, a.group, a.residual
        sdt = jnp.dtype(a.scale_dtype)
        c = c // gr * gr
        dense_bytes = 2 * b * hkv * c * d * dtype.itemsize
        if dense_bytes * 1.3 + 4 * b * a.heads * tq * c * 3 > self.mem_limit:
            print(f"  skip quantized B={b} C={c}: exceeds the memory limit", flush=True)
            return
        q, k, v, pos, q_pos = dense_inputs(jax.random.PRNGKey(1), b, hkv, g, c, d, tq, dtype)
        (kc, ks, kz, vc, vs, vz), (kr, vr, rp) = quant_inputs(jax.random.PRNGKey(2), b, hkv, c, d, bits, gr, r, sdt,
                                                            dtype)
        q_pos = q_pos + r
        lens_np = ragged_lengths(np.random.default_rng(1), b, hkv, c, a.budget)
        lengths = jnp.asarray(lens_np)
        per_slot = 2 * d * bits / 8 + 2 * (d / gr) * sdt.itemsize * 2 + 4
        res_bytes = b * hkv * r * (2 * d * dtype.itemsize + 4)
        base = dict(kernel="quantized_decode_attention", batch=b, context=c, hq=a.heads, hkv=hkv, head_dim=d,
                    dtype=dtype.name, tq=tq, bits=bits, mean_len=f"{lens_np.mean():.0f}")
        codes = (kc, ks, kz, vc, vs, vz)

        def kern_fn(q, codes, p, qp, res, L):
            return quantized_decode_attention(q, *codes, p, qp, bits=bits, k_res=res[0], v_res=res[1],
                                              res_pos=res[2], lengths=L, interpret=self.interpret)

        def ref_fn(q, codes, p, qp, res, L):
            return reference.quantized_decode_attention_reference(q, *codes, p, qp, bits=bits, k_res=res[0],
                                                                  v_res=res[1], res_pos=res[2], lengths=L)

        res = (kr, vr, rp)
        kern = jax.jit(kern_fn)
        full = jax.jit(lambda q, codes, p, qp, res: kern_fn(q, codes, p, qp, res, None))
        ref = jax.jit(ref_fn)
        dense = jax.jit(lambda q, k, v, p, qp: decode_attention(q, k, v, p, qp, interpret=self.interpret))
        ragged_bytes = lens_np.sum() * per_slot + res_bytes
        group = [
            self.record(base, "pallas", kern, (q, codes, pos, q_pos, res, lengths), ragged_bytes),
            self.record(base, "pallas_full", full, (q, codes, pos, q_pos, res), b * hkv * c * per_slot + res_bytes),
            self.record(base, "reference", ref, (q, codes, pos, q_pos, res, lengths), ragged_bytes),
            self.record(base, "dense_full", dense, (q, k, v, pos, q_pos), b * hkv * c * (2 * d * dtype.itemsize + 4)),
        ]
        self.finish_group(group)

    def bench_prefill(self, b, c):
        a = self.args
        dtype = jnp.dtype(a.dtype)
        hkv, g, d, tq = a.kv_heads, a.heads // a.kv_heads, a.head_dim, min(a.prefill_chunk, c)
        ref_bytes = 4 * b * a.heads * tq * c * 4  # reference score / probability matrices (f32)
        cache_bytes = 2 * b * hkv * c * d * dtype.itemsize
        if cache_bytes * 1.3 > self.mem_limit:
            print(f"  skip prefill B={b} C={c}: exceeds the memory limit", flush=True)
            return
        q, k, v, pos, q_pos = dense_inputs(jax.random.PRNGKey(3), b, hkv, g, c, d, tq, dtype)
        lens_np = ragged_lengths(np.random.default_rng(2), b, hkv, c, a.budget)
        lens_np = np.maximum(lens_np, tq)
        pos_np = np.full((b, hkv, c), -1, np.int32)
        rng = np.random.default_rng(3)
        for bi in range(b):  # each head: an evicted prefix (sorted sample of earlier positions), then the chunk
            for h in range(hkv):
                lo = int(lens_np[bi, h]) - tq
                pos_np[bi, h, :lo] = np.sort(rng.choice(c - tq, size=lo, replace=False))
                pos_np[bi, h, lo:lo + tq] = c - tq + np.arange(tq)
        pos = jnp.asarray(pos_np)
        lengths = jnp.asarray(lens_np)
        per_slot = 2 * d * dtype.itemsize + 4
        base = dict(kernel="prefill_attention_with_scores", batch=b, context=c, hq=a.heads, hkv=hkv, head_dim=d,
                    dtype=dtype.name, tq=tq, bits="", mean_len=f"{lens_np.mean():.0f}")
        w = min(a.obs_window, tq)
        # pass 1: QK and PV; pass 2: QK again (+ the observation window)
        flops_len = 2 * b * g * tq * d * (3 * lens_np.sum())
        flops_full = 2 * b * g * tq * d * (3 * hkv * c)
        kern = jax.jit(lambda q, k, v, p, qp, L: prefill_attention_with_scores(q, k, v, p, qp, lengths=L, obs_window=w,
                                                                               interpret=self.interpret))
        full = jax.jit(lambda q, k, v, p, qp: prefill_attention_with_scores(q, k, v, p, qp, obs_window=w,
                                                                          interpret=self.interpret))
        ref = jax.jit(lambda q, k, v, p, qp, L: reference.prefill_attention_with_scores_reference(
            q, k, v, p, qp, lengths=L, obs_window=w))
        group = [self.record(base, "pallas", kern, (q, k, v, pos, q_pos, lengths), lens_np.sum() * per_slot, flops_len),
                 self.record(base, "pallas_full", full, (q, k, v, pos, q_pos), b * hkv * c * per_slot, flops_full)]
        if cache_bytes + ref_bytes < self.mem_limit:
            group.append(self.record(base, "reference", ref, (q, k, v, pos, q_pos, lengths),
                                     lens_np.sum() * per_slot, flops_len))
        else:
            print(f"  skip prefill reference B={b} C={c}: its (Tq, C) matrices exceed the memory limit", flush=True)
        self.finish_group(group)

    def write(self):
        out = self.args.out
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=COLUMNS)
            wr.writeheader()
            for r in self.rows:
                wr.writerow({k: r.get(k, "") for k in COLUMNS})
        lines = [f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}); measured copy bandwidth "
                 f"{self.copy_bw / 1e9:.1f} GB/s; budget {self.args.budget}; "
                 f"{'smoke (interpret mode)' if self.args.smoke else 'compiled'}", "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in COLUMNS) + " |" for r in self.rows]
        with open(out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"\nwrote {out}.csv and {out}.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="decode,quantized,prefill,ragged",
                   help="comma list of decode,quantized,prefill,ragged")
    p.add_argument("--contexts", default="4096,16384,65536,131072", help="comma list of cache capacities C")
    p.add_argument("--batches", default="1,8,32", help="comma list of batch sizes (decode kernels)")
    p.add_argument("--prefill-batches", default="1", help="comma list of batch sizes (prefill)")
    p.add_argument("--heads", type=int, default=32, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads Hkv")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--decode-tq", type=int, default=1, help="query tokens per sequence for decode")
    p.add_argument("--prefill-chunk", type=int, default=512, help="Tq of the prefill chunk")
    p.add_argument("--obs-window", type=int, default=32, help="SnapKV observation window of the prefill kernel")
    p.add_argument("--budget", type=float, default=0.25, help="mean fraction of the cache each head keeps (ragged)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--group", type=int, default=32, help="quantization group (keys: tokens, values: channels)")
    p.add_argument("--residual", type=int, default=128, help="full-precision residual window R (0 = none)")
    p.add_argument("--scale-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=10, help="calls per timing sample")
    p.add_argument("--repeats", type=int, default=5, help="timing samples (median reported)")
    p.add_argument("--mem-limit-gb", type=float, default=None, help="skip configs above this (default 70%% of HBM)")
    p.add_argument("--out", default="bench_kernels", help="output prefix (.csv and .md)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU, runs in seconds")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing configurations")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.batches, args.prefill_batches = "256", "1", "1"
        args.heads, args.kv_heads, args.head_dim = 4, 2, 64
        args.prefill_chunk, args.obs_window, args.residual = 16, 4, 16
        args.iters, args.repeats = 1, 1
        args.dtype = "float32"
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    runner = Runner(args)
    runner.measure_copy()
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(kernels) - {"decode", "quantized", "prefill", "ragged"}
    if unknown:
        p.error(f"unknown kernels {sorted(unknown)}")
    for c in parse_ints(args.contexts):
        for kname in kernels:
            batches = parse_ints(args.prefill_batches if kname == "prefill" else args.batches)
            for b in batches:
                print(f"# {kname} B={b} C={c}", flush=True)
                getattr(runner, f"bench_{kname}")(b, c)
    runner.write()
    return runner.rows


if __name__ == "__main__":
    main()
