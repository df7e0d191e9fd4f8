"""MLA upcycling of SmolLM2-135M at several latent ranks: KV bytes per token, held-out perplexity (Wikipedia,
Shakespeare), needle accuracy and answer log-prob, for the original model, X-EcoMLA's SVD initialisation without
training, and after KL distillation (``configs/mla_distill.py``).

    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96,32 --steps 20 --seq-len 128 --lr 1e-3 --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96,32 --diagnostics --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96,32,192 --init pca --steps 20 --seq-len 128 --lr 1e-3 --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 192 --steps 0 --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 192 --diagnostics --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96 --init pca --steps 60 --eval-every 10 --seq-len 128 --lr 1e-3 --out runs/mla_bench
    python benchmarks/mla_upcycle.py --report-only --out runs/mla_bench

Writes ``<out>/results.json``, ``<out>/table.md`` and ``<out>/mla_quality_vs_bytes.png`` (copy the plot to
docs/results/ for the README). Every model is saved under ``<out>/<variant>/model`` and evaluated by path
(``load_pretrained``), so the numbers are those of the saved checkpoints. The needle cells run through the experiment
harness (:func:`kvjax.eval.experiment.run_experiment`, full cache, plus SnapKV on the latent cache for MLA models);
perplexity is the teacher-forced next-token NLL over held-out windows (the held-out split of
:mod:`kvjax.train.data`: the last 10% of the Wikipedia text, which distillation never sees; Shakespeare is not
trained on at all). A distillation with another step count than the config's (20) is labelled
``distilled[_pca]_r<rank>_s<steps>``. Several invocations may write into the same ``--out`` at once: each finished
row is appended to ``results.json`` under a file lock, re-reading what the others wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np


def kv_bytes_per_token(cfg) -> dict:
    from kvjax.state import init_state, kv_nbytes, nbytes

    n = 128
    st = init_state(cfg, 1, n)
    return {"kv_bytes_per_token": kv_nbytes(st) / n, "bytes_per_token_with_positions": (nbytes(st) - 8) / n}


def perplexity(lm, corpus: str, windows: int, seq_len: int) -> float:
    from kvjax.train.data import Batches, DataConfig

    b = Batches(DataConfig(sources=(f"text:{corpus}",), seq_len=seq_len, batch_size=windows, query_tokens=8,
                           seed=777), lm.tokenizer)
    batch = b.heldout(0)
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    model = lm.model
    logits, _ = model.jit_prefill(lm.params, tokens, model.init_state(tokens.shape[0], tokens.shape[1]), mask)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
    ok = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    return float(jnp.exp(jnp.sum(nll * ok) / jnp.sum(ok)))


def needles(name: str, run_dir: str, mla: bool, context: int, budget: int) -> list[dict]:
    from kvjax.eval.experiment import run_experiment

    methods = {"full": {}}
    if mla:
        methods["snapkv"] = {"budget": (budget,)}
    cfg = {"run_dir": run_dir, "model": {"name": name, "dtype": "float32"}, "precompile": False,
           "prompt_style": "plain", "max_new_tokens": 8, "methods": methods,
           "tasks": {"niah_single": {"context_tokens": (context,), "depths": (0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.6, 0.8),
                                     "seeds": (0,), "kwargs": {"filler": "wikipedia"}}},
           "perplexity": {"enabled": False}}
    return run_experiment(cfg, progress=False)


def evaluate(lm, name: str, label: str, out: str, args) -> dict:
    row = {"variant": label, "attention": lm.cfg.attention_type, "kv_rank": lm.cfg.mla_kv_rank,
           "rope_dim": lm.cfg.mla_rope_dim, **kv_bytes_per_token(lm.cfg)}
    t0 = time.perf_counter()
    row["ppl_wikipedia"] = perplexity(lm, "wikipedia", args.ppl_windows, args.ppl_len)
    row["ppl_shakespeare"] = perplexity(lm, "shakespeare", args.ppl_windows, args.ppl_len)
    summ = needles(name, os.path.join(out, label, "needle"), lm.cfg.attention_type == "mla", args.context,
                   args.snap_budget)
    for s in summ:
        tag = "needle" if s["label"] == "full" else "needle_snapkv"
        row[f"{tag}_acc"] = s.get("quality")
        row[f"{tag}_answer_logprob"] = s.get("answer_logprob")
        row[f"{tag}_n"] = s.get("n")
    row["eval_seconds"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)
    return row


def group_of(variant: str) -> str:
    """Plot series of a variant: its label without the rank (``distilled_pca_r96_s60`` -> ``distilled_pca_s60``)."""
    return re.sub(r"_r\d+", "", variant)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    groups = {"original": "*", "svd": "o--", "distilled": "s-", "pca": "^:", "partial_rope_full": "D",
              "distilled_pca": "v-"}
    names = {"original": "original (GQA)", "svd": "X-EcoMLA SVD, untrained", "distilled": "SVD + {} distillation steps",
             "pca": "TransMLA PCA, untrained", "partial_rope_full": "partial RoPE only (full rank 320)",
             "distilled_pca": "PCA + {} distillation steps"}
    for r in rows:  # distillations with another step count: their own series
        g = group_of(r["variant"])
        if g not in groups and g.rsplit("_s", 1)[0] in groups:
            groups[g] = "P-"
            names[g] = names[g.rsplit("_s", 1)[0]]
    steps = {group_of(r["variant"]): r.get("distill_steps") for r in rows if r.get("distill_steps")}
    names = {g: n.format(steps.get(g, "")) for g, n in names.items()}
    for key, ax, lab in (("ppl_wikipedia", axes[0], "perplexity, Wikipedia (held-out)"),
                         ("ppl_shakespeare", axes[1], "perplexity, Shakespeare"),
                         ("needle_acc", axes[2], "needle accuracy (8 prompts)"),
                         ("needle_answer_logprob", axes[3], "needle answer log-prob (full cache)")):
        for i, (g, style) in enumerate(groups.items()):
            pts = sorted((r["kv_bytes_per_token"] / 1024, r[key]) for r in rows
                         if group_of(r["variant"]) == g and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), style, label=names[g], color="k" if g == "original" else f"C{i}")
        ax.set_xlabel("KV KiB per token (all layers, f32)")
        ax.set_ylabel(lab)
        if key.startswith("ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M upcycled to MLA: quality vs KV bytes")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    cols = ["variant", "kv_rank", "rope_dim", "kv_bytes_per_token", "ppl_wikipedia", "ppl_shakespeare", "needle_acc",
            "needle_answer_logprob", "needle_snapkv_acc", "needle_snapkv_answer_logprob", "distill_steps",
            "distill_seconds", "distill_step_s_median", "loadavg_1m_start_end", "first_kl", "heldout_kl_curve"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            if c == "kv_bytes_per_token" and v is not None:
                vals.append(f"{v:,.0f}")
            elif c == "heldout_kl_curve" and v:
                vals.append(" ".join(f"{s}:{k:.3f}" for s, k in v))
            elif isinstance(v, list):
                vals.append(" / ".join(f"{x:.2g}" for x in v))
            else:
                vals.append("—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def training_stats(run_dir: str) -> dict:
    """From a distillation's ``metrics.jsonl``: the median seconds per step (compile included in step 1's, hence
    the median) and the held-out KL curve ``[[step, kl], ...]``; empty if the file is absent."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    metrics = [json.loads(line) for line in open(path) if line.strip()]
    step_s = [m["step_s"] for m in metrics if m.get("split") == "train" and "step_s" in m]
    return {"distill_step_s_median": float(np.median(step_s)) if step_s else None,
            "heldout_kl_curve": [[m["step"], m["loss"]] for m in metrics if m.get("split") == "heldout"]}


def report(rows: list[dict], out: str) -> None:
    """``<out>/table.md`` and ``<out>/mla_quality_vs_bytes.png`` from the rows (both written atomically); distilled
    rows written before the step times and held-out curve were recorded get them from their run's metrics."""
    rows = [{**training_stats(os.path.join(out, r["variant"])), **r} if r.get("distill_steps") else r for r in rows]
    tmp = os.path.join(out, f"table.md.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(table(rows) + "\n")
    os.replace(tmp, os.path.join(out, "table.md"))
    plot(rows, os.path.join(out, "mla_quality_vs_bytes.png"))
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", default="192,96,32")
    ap.add_argument("--rope-heads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60, help="distillation steps per rank (0: no distillation)")
    ap.add_argument("--config", default="configs/mla_distill.py")
    ap.add_argument("--seq-len", type=int, default=0, help="distillation window length (0: the config's)")
    ap.add_argument("--batch", type=int, default=0, help="distillation batch size (0: the config's)")
    ap.add_argument("--lr", type=float, default=0.0, help="distillation peak learning rate (0: the config's)")
    ap.add_argument("--out", default="runs/mla_bench")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--snap-budget", type=int, default=128)
    ap.add_argument("--init", default="svd", choices=("svd", "pca"),
                    help="initialisation of the distilled models (svd: X-EcoMLA; pca: TransMLA, labels distilled_pca_r*)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out KL every this many distillation steps (0: twice, at the middle and the end)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite table.md and the plot from results.json")
    ap.add_argument("--diagnostics", action="store_true",
                    help="perplexity-only rows that separate the two approximations: partial RoPE at full latent rank, "
                         "and TransMLA's PCA (calibrated) instead of X-EcoMLA's SVD at each rank, untrained")
    args = ap.parse_args()

    from kvjax import upcycle
    import runpy
    from kvjax.pretrained import load_pretrained
    from kvjax.train.mla import MLATrainer
    from kvjax.train.run import run_training

    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, "results.json")

    @contextlib.contextmanager
    def locked():
        with open(res_path + ".lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def load() -> list[dict]:
        return json.load(open(res_path)) if os.path.exists(res_path) else []

    with locked():
        rows = load()
    done = {r["variant"] for r in rows}

    def record(row):
        with locked():  # another invocation may have added rows since: re-read, append, replace atomically
            rows[:] = [r for r in load() if r["variant"] != row["variant"]] + [row]
            tmp = f"{res_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(tmp, res_path)

    if args.report_only:
        report(rows, args.out)
        return
    lm = load_pretrained(args.model)
    if args.diagnostics:
        ranks = [int(x) for x in args.ranks.split(",")]
        trainer = MLATrainer({"rope_heads": args.rope_heads, "init": "pca"})
        covs = trainer.calibration(lm)
        specs = [(f"partial_rope_full_r{upcycle.full_rank(lm.cfg, args.rope_heads)}", None, "pca")]
        specs += [(f"pca_r{r}", r, "pca") for r in ranks]
        for label, r, init in specs:
            if label in done:
                continue
            cfg, params = upcycle.upcycle(lm.cfg, lm.params, rope_heads=args.rope_heads, kv_rank=r, init=init,
                                          covs=covs)
            from kvjax.pretrained import Pretrained
            sub = Pretrained(label, cfg, params, lm.tokenizer, lm.prompt_style)
            row = {"variant": label, "attention": "mla", "kv_rank": cfg.mla_kv_rank, "rope_dim": cfg.mla_rope_dim,
                   **kv_bytes_per_token(cfg), "ppl_wikipedia": perplexity(sub, "wikipedia", args.ppl_windows,
                                                                           args.ppl_len),
                   "ppl_shakespeare": perplexity(sub, "shakespeare", args.ppl_windows, args.ppl_len)}
            print(json.dumps(row), flush=True)
            record(row)
        return
    if "original" not in done:
        record(evaluate(lm, args.model, "original", args.out, args))
    base = runpy.run_path(args.config)["get_config"]()
    for r in [int(x) for x in args.ranks.split(",")]:
        method = {**base.train.method.to_dict(), "rope_heads": args.rope_heads, "kv_rank": r, "init": args.init}
        label = f"svd_r{r}"
        if label not in done and args.init == "svd":
            trainer = MLATrainer(method)
            cfg, params = trainer.upcycled(lm)
            path = os.path.join(args.out, label, "model")
            upcycle.save_model(path, cfg, params, tokenizer=args.model, info={"init": "svd", "steps": 0})
            del params
            record(evaluate(load_pretrained(path), path, label, args.out, args))
        label = f"distilled_r{r}" if args.init == "svd" else f"distilled_pca_r{r}"
        if args.steps != base.train.steps:
            label += f"_s{args.steps}"
        if args.steps and label not in done:
            c = base.copy_and_resolve_references()
            c.run_dir = os.path.join(args.out, label)
            c.train.steps = args.steps
            c.train.method = method
            c.train.eval_every = args.eval_every or max(1, args.steps // 2)
            c.train.checkpoint.every = args.steps
            c.train.optim.warmup_steps = min(c.train.optim.warmup_steps, args.steps)
            if args.seq_len:
                c.train.data.seq_len = args.seq_len
            if args.batch:
                c.train.data.batch_size = args.batch
            if args.lr:
                c.train.optim.lr = args.lr
                c.train.optim.end_lr = args.lr / 10
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            summary = run_training(c, progress=False, lm=lm)
            secs, load1 = time.perf_counter() - t0, os.getloadavg()[0]
            row = evaluate(load_pretrained(summary["model"]), summary["model"], label, args.out, args)
            row.update(distill_steps=args.steps, distill_seconds=secs, first_kl=summary["first_loss"],
                       last_kl=summary["last_loss"], heldout_kl=summary["heldout"]["loss"],
                       loadavg_1m_start_end=[load0, load1], **training_stats(c.run_dir))
            record(row)
    report(rows, args.out)


if __name__ == "__main__":
    main()
