"""Knowledge distillation of an upcycled MLA model from its original GQA model (X-EcoMLA, "X-EcoMLA: Upcycling
Pre-Trained Attention into MLA for Efficient and Extreme KV Compression", arXiv 2503.11132), on kvjax.train.

The student is the original model with every layer's attention converted by :func:`kvjax.upcycle.upcycle`
(``init="svd"``: X-EcoMLA's SVD initialisation, the default; ``"pca"``: TransMLA's, arXiv 2502.07864); the teacher is
the original model. The loss is the authors' (``kl_weight: 1.0``, ``ce_weight: 0.0`` in their configs, temperature
1): the mean over the batch's real tokens of ``KL(p_teacher || p_student)`` of the next-token distributions. Only
the MLA attention weights are trained (``q_nope``, ``q_rope``, ``kv_down``, ``k_rope``, ``k_up``, ``v_up``, ``o``); the
embedding, norms and MLPs stay the teacher's, shared and frozen.

Deviations (stated): X-EcoMLA trains every weight (``freeze_non_mla: false``) on billions of tokens with a larger
teacher (SmolLM-1.7B for SmolLM-135M); kvjax distils from the original model itself and trains the attention only,
for minutes on a CPU (the launch configs say how long). At the end the full upcycled model is saved with
:func:`kvjax.upcycle.save_model` to ``<run_dir>/model`` (``load_pretrained("<run_dir>/model")``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import upcycle
from kvjax.state import init_state


def _logits(cfg, params, tokens, mask):
    from kvjax.models import forward_fn  # noqa: PLC0415

    state = init_state(cfg, tokens.shape[0], tokens.shape[1])
    out, _, _ = forward_fn(cfg)(cfg, params, tokens, state, mask)
    return out


def distill_loss(student_cfg, teacher_cfg, temperature: float = 1.0):
    """``loss(attn, teacher_params, batch, key) -> (loss, metrics)``: forward KL teacher -> student per real token
    (the LM loss of the student is reported as a metric, not optimised)."""

    def loss(attn, params, batch, key):
        del key
        tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
        t_logits = jax.lax.stop_gradient(_logits(teacher_cfg, params, tokens, mask))
        s_logits = _logits(student_cfg, upcycle.merge_attention(params, attn), tokens, mask)
        lt = jax.nn.log_softmax(t_logits / temperature, axis=-1)
        ls = jax.nn.log_softmax(s_logits / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)  # (B, T)
        w = mask.astype(jnp.float32)
        kl = jnp.sum(kl * w) / jnp.maximum(w.sum(), 1.0)
        nxt = mask[:, 1:] & mask[:, :-1]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(s_logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
        ce = jnp.sum(ce * nxt) / jnp.maximum(nxt.sum(), 1)
        return kl * temperature ** 2, {"kl": kl, "student_ce": ce}

    return loss


class MLATrainer:
    """What :func:`kvjax.train.run.run_training` needs for ``train.kind = "mla"`` (see module docstring).

    ``method`` config: ``rope_heads`` (decoupled RoPE key chunks, default 1: TransMLA's and DeepSeek's single 64-wide
    RoPE key for 64-wide heads), ``kv_rank`` (latent width), ``init`` (``"svd"`` | ``"pca"``), ``calib_source`` /
    ``calib_seqs`` / ``calib_len`` (calibration text for the RoRoPE rotation and PCA; ``calib_seqs = 0`` with
    ``init="svd"``: data-free, the rotation from the key weights), ``balance_kv``,
    ``temperature``."""

    kind = "mla"

    def __init__(self, cfg: dict):
        cfg = dict(cfg)
        known = {"rope_heads", "kv_rank", "init", "calib_source", "calib_seqs", "calib_len", "balance_kv",
                 "temperature"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"train.method has unknown keys {unknown} for kind 'mla'; valid: {sorted(known)}")
        self.rope_heads = int(cfg.get("rope_heads", 1))
        self.kv_rank = cfg.get("kv_rank")
        self.kv_rank = None if self.kv_rank is None else int(self.kv_rank)
        self.init_kind = str(cfg.get("init", "svd"))
        self.calib_source = str(cfg.get("calib_source", "text:wikipedia"))
        self.calib_seqs = int(cfg.get("calib_seqs", 8))
        self.calib_len = int(cfg.get("calib_len", 256))
        self.balance_kv = bool(cfg.get("balance_kv", True))
        self.temperature = float(cfg.get("temperature", 1.0))
        if self.temperature <= 0:
            raise ValueError(f"train.method.temperature must be > 0, got {self.temperature}")
        if self.calib_seqs < 0 or self.calib_len < 16:
            raise ValueError(f"calib_seqs must be >= 0 and calib_len >= 16, got {self.calib_seqs}, {self.calib_len}")
        if self.calib_seqs == 0 and self.init_kind == "pca":
            raise ValueError("init='pca' (TransMLA) needs calibration data: set calib_seqs >= 1")
        self.student_cfg = None

    def _student_cfg(self, teacher_cfg):
        if self.student_cfg is None:
            self.student_cfg = upcycle.mla_config(teacher_cfg, self.rope_heads, self.kv_rank, self.init_kind)
        return self.student_cfg

    def calibration(self, lm) -> list:
        """Per-layer key/value covariance of the original model over ``calib_seqs`` windows of the calibration text
        (train split of :mod:`kvjax.train.data`)."""
        from kvjax.train.data import Batches, DataConfig  # noqa: PLC0415

        b = Batches(DataConfig(sources=(self.calib_source,), seq_len=self.calib_len, batch_size=1,
                               query_tokens=8, seed=12345), lm.tokenizer)
        pairs = [(x["tokens"], x["mask"]) for x in (b.train(i) for i in range(self.calib_seqs))]
        return upcycle.kv_covariance(lm.model, lm.params, pairs)

    def upcycled(self, lm):
        """``(mla_cfg, mla_params)``: the initialised (untrained) student."""
        self._student_cfg(lm.cfg)
        covs = self.calibration(lm) if self.calib_seqs else None  # None: data-free SVD, rotation from the weights
        return upcycle.upcycle(lm.cfg, lm.params, rope_heads=self.rope_heads, kv_rank=self.kv_rank,
                               init=self.init_kind, covs=covs, balance_kv=self.balance_kv)

    def init(self, lm, key):
        del key
        _, params = self.upcycled(lm)
        return upcycle.attention_params(params)

    def loss_fn(self, model):
        return distill_loss(self._student_cfg(model.cfg), model.cfg, self.temperature)

    project = None

    def info(self) -> dict:
        return {"rope_heads": self.rope_heads, "kv_rank": self.kv_rank, "init": self.init_kind,
                "student_config": None if self.student_cfg is None else upcycle._cfg_to_json(self.student_cfg)}

    def finalize(self, lm, params, info) -> dict:
        cfg = self.student_cfg
        return {"kv_rank": cfg.mla_kv_rank, "rope_dim": cfg.mla_rope_dim,
                "kv_floats_per_token_layer": cfg.mla_kv_rank + cfg.mla_rope_dim,
                "gqa_kv_floats_per_token_layer": 2 * lm.cfg.num_kv_heads * lm.cfg.head_dim}

    def save_model(self, lm, params, path: str, info: dict) -> None:
        """The distilled upcycled model, loadable with ``load_pretrained(path)``."""
        full = upcycle.merge_attention(lm.params, jax.tree_util.tree_map(np.asarray, params))
        upcycle.save_model(path, self.student_cfg, full, tokenizer=lm.name, prompt_style=lm.prompt_style,
                           info={"kind": "mla", "teacher": lm.name, "steps": info.get("steps"),
                                 "init": self.init_kind})
