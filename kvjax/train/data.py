"""Deterministic training batches from the texts kvjax ships and from the synthetic task generators.

A batch is a pure function of ``(seed, step)`` (train) or ``(seed, index)`` (held-out), so a resumed run continues
with exactly the batches it would have seen, and no iterator state needs checkpointing. Every batch is a dict of
numpy arrays, all ``(B, T)``:

* ``tokens`` int32, left-padded; ``mask`` (False = padding);
* ``query_mask``: the tokens whose attention defines targets (Locret: the "later queries"; the last ``query_tokens``
  of a text window, or question + answer of a task example);
* ``label_mask``: the tokens a distillation / LM loss is computed on (DuoAttention: the answer of a task example;
  the last ``query_tokens`` of a text window).

Sources (``data.sources``, mixed per example with ``data.weights``):

* ``"text:<corpus>"`` (``kvjax.data.corpora`` names: ``wikipedia``, ``shakespeare``, a play): random windows of
  ``seq_len`` tokens of the first ``max_chars`` characters (the first token replaced by BOS for a tokenizer whose
  model expects one, Gemma 3). The last ``heldout_fraction`` of the tokens is the
  held-out split; train windows never overlap it.
* ``"task:<name>"`` (``kvjax.eval.tasks``: ``passkey``, ``niah_single`` ...): examples of about ``seq_len`` tokens
  at uniform random depths. Train examples use generator seeds from ``TRAIN_SEED_OFFSET`` on and held-out ones from
  ``HELDOUT_SEED_OFFSET`` on: disjoint from each other and from the small seeds (0, 1, ...) every evaluation in
  kvjax uses (configs, benchmarks, notebooks), so no evaluated needle or pass key was seen in training.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

TRAIN_SEED_OFFSET = 500_000_003  # task generator seeds of training examples (+ 10M x data.seed + example index)
HELDOUT_SEED_OFFSET = 1_000_000_007


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ("text:wikipedia",)
    weights: tuple[float, ...] = ()
    seq_len: int = 512
    batch_size: int = 4
    query_tokens: int = 64
    heldout_fraction: float = 0.1
    max_chars: int = 400_000
    seed: int = 0
    task_kwargs: tuple = ()  # ((key, value), ...) passed to every task generator (e.g. filler)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"data config has unknown keys {sorted(unknown)}; valid: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        if "task_kwargs" in d:
            d["task_kwargs"] = tuple(sorted(dict(d["task_kwargs"]).items()))
        for k in ("sources", "weights"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources is empty")
        for s in self.sources:
            kind, _, name = s.partition(":")
            if kind not in ("text", "task") or not name:
                raise ValueError(f"data source {s!r}: use 'text:<corpus>' or 'task:<task name>'")
        if self.weights and len(self.weights) != len(self.sources):
            raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.sources)} sources")
        if self.seq_len < 16 or self.batch_size < 1:
            raise ValueError(f"data.seq_len must be >= 16 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if not 0 < self.query_tokens < self.seq_len:
            raise ValueError(f"data.query_tokens must be in (0, seq_len={self.seq_len}), got {self.query_tokens}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if any(s.startswith("task:") for s in self.sources) and not 0 <= self.seed < 50:
            # train task seeds TRAIN_SEED_OFFSET + 10M x seed must stay below HELDOUT_SEED_OFFSET
            raise ValueError(f"data.seed must be in [0, 50) with task sources, got {self.seed}")


class Batches:
    """Deterministic train / held-out batches for one tokenizer (see module docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer
        for s in cfg.sources:  # fail early on unknown names
            kind, _, name = s.partition(":")
            if kind == "task":
                from kvjax.eval.tasks import get_task  # noqa: PLC0415

                get_task(name)
            else:
                self._corpus_tokens(name)

    @functools.lru_cache(maxsize=8)
    def _corpus_tokens(self, name: str) -> np.ndarray:
        from kvjax.data.corpora import load_text  # noqa: PLC0415

        ids = np.asarray(self.tok.encode(load_text(name)[: self.cfg.max_chars]), np.int32)
        if len(ids) < 4 * self.cfg.seq_len:
            raise ValueError(f"corpus {name!r} gives {len(ids)} tokens in its first {self.cfg.max_chars} characters, "
                             f"too few for seq_len={self.cfg.seq_len} windows with a held-out split")
        return ids

    def _text(self, name: str, rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, int, int]:
        ids = self._corpus_tokens(name)
        t = self.cfg.seq_len
        cut = int(len(ids) * (1 - self.cfg.heldout_fraction))
        lo, hi = (cut, len(ids) - t) if heldout else (0, cut - t)
        start = int(rng.integers(lo, hi + 1))
        q = self.cfg.query_tokens
        window = ids[start:start + t]
        if self._bos() is not None:  # models trained with BOS (Gemma) see every window after it, as in evaluation
            window = np.concatenate([[self._bos()], window[1:]]).astype(np.int32)
        return window, t - q, t - q

    def _bos(self) -> int | None:
        """The BOS id when the model expects one at the start of a sequence (Gemma 3), else None."""
        if getattr(self.tok, "add_bos_token", False) and getattr(self.tok, "bos_id", None) is not None:
            return int(self.tok.bos_id)
        return None

    def _task(self, name: str, seed: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        from kvjax.eval.tasks import format_prompt, get_task  # noqa: PLC0415

        t = self.cfg.seq_len
        kw = dict(self.cfg.task_kwargs)
        ex = get_task(name)(seed, max(16, t - 48), float(rng.uniform(0.05, 0.95)), self.tok.count, **kw)
        bos = self._bos() is not None
        ctx_ids = self.tok.encode(ex.user_message(), add_bos=bos)
        prompt_ids = self.tok.encode(format_prompt(ex, "plain"), add_bos=bos)
        ans_ids = self.tok.encode(" " + ex.answers[0])
        ids = np.asarray(prompt_ids + ans_ids, np.int32)
        q_start = len(ctx_ids) - len(self.tok.encode("\n\n" + ex.question)) if ex.question else len(prompt_ids)
        a_start = len(prompt_ids)
        if len(ids) > t:  # cut the context's start (question and answer stay)
            drop = len(ids) - t
            ids, q_start, a_start = ids[drop:], max(0, q_start - drop), a_start - drop
            if bos:
                ids = np.concatenate([[self._bos()], ids[1:]]).astype(np.int32)
        return ids, q_start, a_start

    def _example(self, source: str, seed: int, heldout: bool):
        kind, _, name = source.partition(":")
        rng = np.random.default_rng([self.cfg.seed, seed, int(heldout)])
        if kind == "text":
            return self._text(name, rng, heldout)
        offset = HELDOUT_SEED_OFFSET if heldout else TRAIN_SEED_OFFSET + 10_000_000 * self.cfg.seed
        return self._task(name, offset + seed, rng)

    def _batch(self, index: int, heldout: bool) -> dict:
        c = self.cfg
        t = c.seq_len
        pick = np.random.default_rng([c.seed, index, 7 + int(heldout)])
        w = np.asarray(c.weights or [1.0] * len(c.sources), np.float64)
        out = {k: np.zeros((c.batch_size, t), dt) for k, dt in
               (("tokens", np.int32), ("mask", bool), ("query_mask", bool), ("label_mask", bool))}
        for b in range(c.batch_size):
            src = c.sources[int(pick.choice(len(c.sources), p=w / w.sum()))]
            ids, q_start, a_start = self._example(src, index * c.batch_size + b, heldout)
            off = t - len(ids)
            out["tokens"][b, off:] = ids
            out["mask"][b, off:] = True
            out["query_mask"][b, off + q_start:] = True
            out["label_mask"][b, off + a_start:] = True
        return out

    def train(self, step: int) -> dict:
        """The batch of training step ``step``."""
        return self._batch(int(step), heldout=False)

    def heldout(self, index: int) -> dict:
        """Held-out batch ``index`` (disjoint text region / generator seeds)."""
        return self._batch(int(index), heldout=True)
