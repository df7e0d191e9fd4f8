"""kvjax vs transformers on the embedded real model: logits on real text, perplexity on the same tokens, a sample.

Usage: python benchmarks/real_model_parity.py [--model smollm2-135m|gemma3-270m] [--tokens 1024] [--corpus hamlet]
Prints max |logit diff|, both perplexities, and a greedy chat answer. Needs the test extras (torch, transformers).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np


def hf_model(gguf_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    d, name = os.path.split(gguf_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    from kvjax.eval.scoring import log_softmax

    lp = log_softmax(logits[:-1].astype(np.float64))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--corpus", default="hamlet")
    args = ap.parse_args()
    from kvjax.checkpoints.gguf import gemma3_gguf_path, smollm2_gguf_path
    from kvjax.data.corpora import load_text
    from kvjax.generate import generate
    from kvjax.pretrained import load_pretrained

    t0 = time.time()
    lm = load_pretrained(args.model, progress=False)
    print(f"kvjax load: {time.time() - t0:.1f}s")
    tok = lm.tokenizer
    ids = np.asarray(tok.encode(load_text(args.corpus), add_bos=tok.add_bos_token)[: args.tokens], np.int32)
    model = lm.model
    t0 = time.time()
    ours, _ = model.jit_prefill(lm.params, jnp.asarray(ids[None]), model.init_state(1, len(ids)))
    ours = np.asarray(ours[0])
    print(f"kvjax prefill of {len(ids)} tokens: {time.time() - t0:.1f}s (incl. compile)")
    t0 = time.time()
    ref_model = hf_model(smollm2_gguf_path() if args.model == "smollm2-135m" else gemma3_gguf_path())
    ref = hf_logits(ref_model, ids)
    print(f"transformers load + forward: {time.time() - t0:.1f}s")
    print(f"max |logits diff| over {len(ids)} tokens: {np.abs(ours - ref).max():.2e}")
    print(f"perplexity on {args.corpus} ({len(ids)} tokens): kvjax {np.exp(nll(ours, ids)):.3f}  "
          f"transformers {np.exp(nll(ref, ids)):.3f}")
    prompt = lm.chat_prefix("What is the capital of France?") if tok.chat_format == "chatml" else \
        "The capital of France is"
    p = jnp.asarray([tok.encode(prompt, add_bos=tok.add_bos_token)], jnp.int32)
    out = generate(model, lm.params, p, max_new_tokens=40, stop_tokens=tuple(tok.eos_ids))
    print("sample:", repr(prompt[-60:]), "->", repr(tok.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist(),
                                                                skip_special_tokens=True)))


if __name__ == "__main__":
    main()
