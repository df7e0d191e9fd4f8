"""RotateKV's offline key-channel reordering for a model, calibrated on Wikipedia text (not the evaluation texts).

    python scripts/calibrate_rotatekv.py --model smollm2-135m --samples 8 --tokens 1024 \
        --out kvjax/data/rotatekv/smollm2-135m.npz

As the authors' ``k_reordering_calibration.py``: per layer, the grouped-head-rotated pre-RoPE keys of all calibration
tokens are summed per channel and the channels sorted (ascending). See :mod:`kvjax.compress.rotatekv`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import kvjax
from kvjax.compress.rotatekv import calibrate, save_calibration
from kvjax.data.corpora import load_text
from kvjax.pretrained import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="wikipedia")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--head-group", type=int, default=4)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    lm = load_pretrained(a.model)
    ids = np.asarray(lm.tokenizer.encode(load_text(a.corpus)), np.int32)
    need = a.samples * a.tokens
    if len(ids) < need:
        raise SystemExit(f"corpus {a.corpus!r} has {len(ids)} tokens, need {need}")
    toks = ids[:need].reshape(a.samples, a.tokens)
    t0 = time.perf_counter()
    perm = calibrate(kvjax.Model(lm.cfg), lm.params, toks, head_group=a.head_group, batch=1)
    save_calibration(a.out, perm, head_group=a.head_group, model=a.model, corpus=a.corpus,
                     samples=a.samples, tokens=a.tokens)
    print(f"{a.out}: permutations {perm.shape} from {need} {a.corpus} tokens in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
