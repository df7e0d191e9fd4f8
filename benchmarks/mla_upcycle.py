"""MLA upcycling of SmolLM2-135M at several latent ranks: KV bytes per token, held-out perplexity (Wikipedia,
Shakespeare), needle accuracy and answer log-prob, for the original model, X-EcoMLA's SVD initialisation without
training, and after KL distillation (``configs/mla_distill.py``).

    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96,32 --steps 20 --seq-len 128 --lr 1e-3 --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96,32 --diagnostics --out runs/mla_bench
    nice -n 10 python benchmarks/mla_upcycle.py --ranks 96 --init pca --steps 20 --seq-len 128 --lr 1e-3 --out runs/mla_bench
    python benchmarks/mla_upcycle.py --report-only --out runs/mla_bench

Writes ``<out>/results.json``, ``<out>/table.md`` and ``<out>/mla_quality_vs_bytes.png`` (copy the plot to
docs/results/ for the README). Every model is saved under ``<out>/<variant>/model`` and evaluated by path
(``load_pretrained``), so the numbers are those of the saved checkpoints. The needle cells run through the experiment
harness (:func:`kvjax.eval.experiment.run_experiment`, full cache, plus SnapKV on the latent cache for MLA models);
perplexity is the teacher-forced next-token NLL over held-out windows (the held-out split of
:mod:`kvjax.train.data`: the last 10% of the Wikipedia text, which distillation never sees; Shakespeare is not
trained on at all).
"""
from __future__ import annotations

import argparse
import json
import os
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


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = {"original": "k*", "svd": "o--", "distilled": "s-", "pca": "^:", "partial": "D", "distilled_pca": "v-"}
    names = {"original": "original (GQA)", "svd": "X-EcoMLA SVD, untrained", "distilled": "SVD + 20 distillation steps",
             "pca": "TransMLA PCA, untrained", "partial": "partial RoPE only (full rank 320)",
             "distilled_pca": "PCA + 20 distillation steps"}
    for key, ax, lab in (("ppl_wikipedia", axes[0], "perplexity, Wikipedia (held-out)"),
                         ("ppl_shakespeare", axes[1], "perplexity, Shakespeare"),
                         ("needle_acc", axes[2], "needle accuracy (8 prompts)")):
        for g, style in groups.items():
            pts = sorted((r["kv_bytes_per_token"] / 1024, r[key]) for r in rows
                         if r["variant"].split("_r")[0] == g and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), style, label=names[g])
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
            "needle_answer_logprob", "needle_snapkv_acc", "needle_snapkv_answer_logprob"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            vals.append("—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


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
    rows = json.load(open(res_path)) if os.path.exists(res_path) else []
    done = {r["variant"] for r in rows}

    def record(row):
        rows.append(row)
        with open(res_path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(res_path + ".tmp", res_path)

    if args.report_only:
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table(rows) + "\n")
        plot(rows, os.path.join(args.out, "mla_quality_vs_bytes.png"))
        print(table(rows))
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
        if args.steps and label not in done:
            c = base.copy_and_resolve_references()
            c.run_dir = os.path.join(args.out, label)
            c.train.steps = args.steps
            c.train.method = method
            c.train.eval_every = max(1, args.steps // 2)
            c.train.checkpoint.every = args.steps
            c.train.optim.warmup_steps = min(c.train.optim.warmup_steps, args.steps)
            if args.seq_len:
                c.train.data.seq_len = args.seq_len
            if args.batch:
                c.train.data.batch_size = args.batch
            if args.lr:
                c.train.optim.lr = args.lr
                c.train.optim.end_lr = args.lr / 10
            t0 = time.perf_counter()
            summary = run_training(c, progress=False, lm=lm)
            secs = time.perf_counter() - t0
            row = evaluate(load_pretrained(summary["model"]), summary["model"], label, args.out, args)
            row.update(distill_steps=args.steps, distill_seconds=secs, first_kl=summary["first_loss"],
                       last_kl=summary["last_loss"], heldout_kl=summary["heldout"]["loss"])
            record(row)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(rows) + "\n")
    plot(rows, os.path.join(args.out, "mla_quality_vs_bytes.png"))
    print(table(rows))


if __name__ == "__main__":
    main()
