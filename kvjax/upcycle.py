"""Upcycling a pretrained GQA model into multi-head latent attention (MLA): TransMLA's exact rewrite and rank reduction,
X-EcoMLA's SVD initialisation, and saving / loading the upcycled model.

Papers and the authors' code read for this module:

* TransMLA — "TransMLA: Multi-Head Latent Attention Is All You Need", Meng et al., arXiv 2502.07864
  (github.com/fxmeng/TransMLA, ``transmla/partial_rope.py``, ``transmla/lora_qkv.py``, ``converter.py``).
* X-EcoMLA — "X-EcoMLA: Upcycling Pre-Trained Attention into MLA for Efficient and Extreme KV Compression", Li et
  al., arXiv 2503.11132 (github.com/AMD-AGI/AMD-Hybrid-Models, ``X-EcoMLA/mla/hybrid_mla_layer.py``: ``re_init_kv``).

The MLA layer layout is :mod:`kvjax.models.mla`'s. The conversion of one layer (``W_q`` ``(D, Hq, dh)``, ``W_k`` /
``W_v`` ``(D, Hkv, dh)``, query head ``i`` in KV group ``g(i)``):

1. **GQA -> MLA (TransMLA §3, exact).** The keys and values of all KV heads are the latent; head ``i``'s key is the
   up-projection that picks group ``g(i)`` (TransMLA's identity-block ``k_up_proj`` / ``v_up_proj``).
2. **RoRoPE (TransMLA §4, exact).** Per RoPE frequency ``f``, an orthogonal ``E_f`` ``(Hkv, Hkv)`` mixes the KV heads'
   ``f``-th 2-D rotation planes: ``k'_j = sum_m E_f[m, j] k_m``. A rotation applied identically to both coordinates of
   a plane commutes with RoPE, so scores are unchanged when every query head sees ``k_g(i) = sum_j E_f[g(i), j] k'_j``.
   ``E_f`` holds the eigenvectors of the keys' joint covariance over heads (real and imaginary coordinates as
   samples, damping ``0.01 * mean(diag)``, decreasing eigenvalue: the authors' ``joint_complex_pca``), so the first
   rotated heads carry most of the key energy. The first ``rope_heads`` rotated heads keep RoPE: they are the
   decoupled RoPE key ``k_r`` shared by all heads (``rope_heads = Hkv``: nothing dropped, the rewrite stays exact).
   The other rotated heads lose RoPE (TransMLA's partial RoPE: an approximation) and join the latent as NoPE keys;
   query heads then get a NoPE part (their original query) and a RoPE part per kept rotated head.
3. **Rank reduction to ``kv_rank``**, the latent ``L = h @ [W_k'_nope, W_v]`` (width
   ``m = (Hkv - rope_heads) dh + Hkv dh``) projected on ``r`` directions ``R`` (``c = L @ R``, up-projections
   ``R^T M``), either

   * ``init="pca"`` — TransMLA's ``LoraQKV``: PCA of calibration activations of ``L`` after balancing (BKV: the key
     part divided by ``mean ||k_nope dim|| / mean ||v dim||``, ``balance_kv_ratio = 1``, multiplied back in the
     up-projection), or
   * ``init="svd"`` — X-EcoMLA's initialisation: truncated SVD ``U_r S_r V_r^T`` of the stacked, group-replicated key
     and value projections (``[K_rep; V_rep]``, here ``[W_k'_nope; W_v] @ M`` with the up-maps ``M``), down-projection
     ``S_r V_r^T`` (singular values on the down side, as ``re_init_kv``), up-projections ``U_r``. Data-free.

   Both are exact at full rank (``kv_rank = m``); a larger rank is refused.

Deviations, with reasons:

* TransMLA's ``freqfold`` (treating adjacent frequencies as one in RoRoPE) is not implemented (``freqfold = 1``: the
  exact rotation); its ``collapse`` is 1 (``qk_mqa_dim = head_dim``, the authors' default for 64-wide heads).
* Calibration: TransMLA uses 128 sequences of 256 WikiText-2 tokens, and recalibrates the rank reduction on the
  partial-RoPE model; kvjax takes the covariance of the original model's keys/values over the sequences it is given
  (a few on a CPU) for both steps. The statistics are those of the original model's inputs to each layer.
* X-EcoMLA's decoupled RoPE key is the mean over KV heads of the last ``qk_rope_head_dim`` rows of each head's
  ``W_k`` (with new, narrower RoPE frequencies): not exact at any rank. kvjax's SVD initialisation keeps TransMLA's
  RoRoPE key instead (``rope_heads`` full ``head_dim`` chunks with the model's frequencies; the rotation from the
  weights' key covariance ``W_k^T W_k`` when no calibration data is given), so that the SVD is exact at full rank.
* The query stays full rank (X-EcoMLA also SVD-compresses it, ``q_lora_rank``; that does not change the KV cache),
  no RMSNorm on the latent (X-EcoMLA's ``use_lora_layer_norm: false``, TransMLA's default), no biases (Qwen2's q/k/v
  biases are refused), Llama-family models only (Gemma 3's per-head QK-norm is not linear in the latent).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig, RopeScaling

INITS = ("pca", "svd")
MODEL_FILE = "kvjax_model.json"
FORMAT = "kvjax-upcycled-model"


# ------------------------------------------------------------------------------------------------ hyper-parameters


def full_rank(cfg: ModelConfig, rope_heads: int) -> int:
    """Width ``m`` of the un-reduced latent: NoPE keys of the non-RoPE rotated heads plus all values."""
    return (cfg.num_kv_heads - rope_heads) * cfg.head_dim + cfg.num_kv_heads * cfg.head_dim


def check_upcycle_args(cfg: ModelConfig, rope_heads: int, kv_rank: int | None, init: str) -> int:
    """One-line errors for bad hyper-parameters (before any computation); returns the latent rank to use."""
    if cfg.attention_type != "gqa":
        raise ValueError("the model is already MLA: upcycle its original GQA checkpoint")
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        raise ValueError(f"MLA upcycling supports Llama-family models, not {cfg.architecture} (Gemma 3's QK-norm is not "
                         "linear in the latent)")
    if cfg.attention_bias or cfg.sliding_window:
        raise ValueError("MLA upcycling supports models without q/k/v biases and without sliding windows")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if not isinstance(rope_heads, int) or not 1 <= rope_heads <= cfg.num_kv_heads:
        raise ValueError(f"rope_heads must be an int in [1, num_kv_heads={cfg.num_kv_heads}], got {rope_heads!r}")
    m = full_rank(cfg, rope_heads)
    limit = min(m, cfg.hidden_size) if init == "svd" else m
    if kv_rank is None:
        return limit
    if not isinstance(kv_rank, int) or isinstance(kv_rank, bool) or not 1 <= kv_rank <= limit:
        raise ValueError(f"kv_rank (latent rank) must be an int in [1, {limit}] (the full rank of the latent for "
                         f"rope_heads={rope_heads}{', capped by hidden_size' if limit < m else ''}), got {kv_rank!r}")
    return kv_rank


def mla_config(cfg: ModelConfig, rope_heads: int, kv_rank: int | None = None, init: str = "pca") -> ModelConfig:
    """The MLA config of an upcycled ``cfg`` (``kv_rank`` None: full rank)."""
    r = check_upcycle_args(cfg, rope_heads, kv_rank, init)
    nope = cfg.head_dim if rope_heads < cfg.num_kv_heads else 0
    return dataclasses.replace(cfg, mla_kv_rank=r, mla_rope_heads=rope_heads, mla_nope_dim=nope).validate()


# ----------------------------------------------------------------------------------------------- calibration


def kv_covariance(model, params, batches: Sequence[tuple[Any, Any]]) -> list[np.ndarray]:
    """Per layer, the float64 second-moment matrix ``sum [k, v]^T [k, v]`` ``(2 Hkv dh, 2 Hkv dh)`` of the pre-RoPE
    keys and values (``[k heads..., v heads...]``) over the valid tokens of ``batches`` (``(tokens, mask)`` pairs)."""
    from kvjax.attention import Observe  # noqa: PLC0415

    cfg = model.cfg
    hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    covs = [np.zeros((2 * hkv * dh,) * 2) for _ in range(cfg.num_layers)]
    for tokens, mask in batches:
        tokens = jnp.asarray(tokens, jnp.int32)
        mask = jnp.asarray(mask, bool)
        state = model.init_state(tokens.shape[0], tokens.shape[1])
        _, _, obs = model.jit_forward(params, tokens, state, mask, observe=Observe(inputs=True), logits="none")
        m = np.asarray(mask).reshape(-1)
        for i, o in enumerate(obs):
            kv = np.asarray(o["qkv"], np.float64).reshape(-1, (hq + 2 * hkv) * dh)[m][:, hq * dh:]
            covs[i] += kv.T @ kv
    return covs


def _freq_index(dh: int) -> np.ndarray:
    """RoPE frequency of every head dimension (rotate-half layout: dims ``f`` and ``f + dh/2`` form plane ``f``)."""
    return np.arange(dh) % (dh // 2)


def rorope_rotation(cov_k: np.ndarray, hkv: int, dh: int) -> np.ndarray:
    """TransMLA's RoRoPE rotation ``E`` ``(dh/2, Hkv, Hkv)``: per frequency, eigenvectors (columns, decreasing
    eigenvalue) of the keys' covariance over heads, both plane coordinates as samples, damped by 1% of the mean
    diagonal (``joint_complex_pca`` with ``freqfold = 1``). ``cov_k``: ``(Hkv dh, Hkv dh)`` in ``(head, dim)`` order."""
    c = cov_k.reshape(hkv, dh, hkv, dh)
    half = dh // 2
    out = np.zeros((half, hkv, hkv))
    for f in range(half):
        h = c[:, f, :, f] + c[:, f + half, :, f + half]
        h = h + np.eye(hkv) * 0.01 * np.mean(np.diag(h))
        w, v = np.linalg.eigh(h)
        out[f] = v[:, np.argsort(w)[::-1]]
    return out


# ---------------------------------------------------------------------------------------------- conversion


def _layer_maps(cfg: ModelConfig, p: dict, rot: np.ndarray, rope_heads: int):
    """The exact (full-rank) MLA pieces of one layer after RoRoPE: RoPE query/key weights, the latent's projection
    ``W_L`` ``(D, m)``, the key and value up-maps ``M_k`` ``(m_k, Hq dh)``, ``M_v`` ``(Hkv dh, Hq dh)`` and the
    selector of the latent's key part ``T`` (``[k, v] -> L``, for calibration statistics)."""
    hq, hkv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    g = np.arange(hq) // cfg.group_size
    e = rot[_freq_index(dh)]  # (dh, Hkv, Hkv): E for every head dimension
    wq = np.asarray(p["q"], np.float64).reshape(d, hq, dh)
    wk = np.asarray(p["k"], np.float64).reshape(d, hkv, dh)
    wv = np.asarray(p["v"], np.float64).reshape(d, hkv * dh)
    wk_rot = np.einsum("xmd,dmj->xjd", wk, e)  # rotated key heads k'_j
    nr = rope_heads
    k_rope = wk_rot[:, :nr].reshape(d, nr * dh)
    # q_rope[i, j, d] = E_d[g(i), j] q_i[d]
    q_rope = np.einsum("xid,dij->xijd", wq, e[:, g, :nr]).reshape(d, hq * nr * dh)
    nn_ = hkv - nr
    # M_k[(j, d), (i, d)] = E_d[g(i), nr + j]: NoPE latent key dims to head i's NoPE key
    mk = np.einsum("dij,de->jdie", e[:, g, nr:], np.eye(dh)).reshape(nn_ * dh, hq * dh)
    mv = np.einsum("mi,de->mdie", (np.arange(hkv)[:, None] == g[None, :]).astype(np.float64),
                   np.eye(dh)).reshape(hkv * dh, hq * dh)
    wl = np.concatenate([wk_rot[:, nr:].reshape(d, nn_ * dh), wv], axis=1)
    # T: [k (Hkv dh), v (Hkv dh)] -> L = [k'_nope, v]
    t_k = np.einsum("mjd,de->mdje", np.transpose(e, (1, 2, 0))[:, nr:, :] if nn_ else np.zeros((hkv, 0, dh)),
                    np.eye(dh)).reshape(hkv * dh, nn_ * dh)
    t = np.zeros((2 * hkv * dh, nn_ * dh + hkv * dh))
    t[:hkv * dh, :nn_ * dh] = t_k
    t[hkv * dh:, nn_ * dh:] = np.eye(hkv * dh)
    return wq.reshape(d, hq * dh), q_rope, k_rope, wl, mk, mv, t


def upcycle_layer(cfg: ModelConfig, p: dict, rope_heads: int, kv_rank: int, init: str,
                  cov_kv: np.ndarray | None = None, balance_kv: bool = True, dtype=None) -> dict:
    """MLA params of one GQA layer ``p`` (see the module docstring). ``cov_kv``: the layer's key/value covariance
    (:func:`kv_covariance`), needed by ``init="pca"``; for ``"svd"`` it only sets the RoRoPE rotation (from the weights
    when None)."""
    hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cov_kv is None:
        if init == "pca":
            raise ValueError("init='pca' (TransMLA) needs calibration statistics (cov_kv); init='svd' is data-free")
        wk = np.asarray(p["k"], np.float64)
        cov_k = wk.T @ wk
    else:
        cov_k = np.asarray(cov_kv, np.float64)[:hkv * dh, :hkv * dh]
    rot = rorope_rotation(cov_k, hkv, dh)
    wq, q_rope, k_rope, wl, mk, mv, t = _layer_maps(cfg, p, rot, rope_heads)
    nk = mk.shape[0]
    m = wl.shape[1]
    up = np.zeros((m, mk.shape[1] + mv.shape[1]))
    up[:nk, :mk.shape[1]] = mk
    up[nk:, mk.shape[1]:] = mv
    if init == "pca":
        cov_l = t.T @ np.asarray(cov_kv, np.float64) @ t
        ratio = 1.0
        if balance_kv and nk:
            dn = np.sqrt(np.maximum(np.diag(cov_l), 0.0))
            ratio = float(np.mean(dn[:nk]) / max(np.mean(dn[nk:]), 1e-30))
        s = np.concatenate([np.full(nk, 1.0 / ratio), np.ones(m - nk)])
        cov_s = cov_l * s[:, None] * s[None, :]
        w, v = np.linalg.eigh(cov_s)
        r_mat = v[:, np.argsort(w)[::-1][:kv_rank]]
        kv_down = (wl * s[None, :]) @ r_mat
        kv_up = r_mat.T @ (up / s[:, None])
    else:  # X-EcoMLA: SVD of the stacked group-replicated key/value projections
        full = wl @ up  # (D, Hq dn + Hq dh)
        u, sv, vt = np.linalg.svd(full.T, full_matrices=False)  # full^T = U S V^T (rows = outputs, as PyTorch)
        kv_down = (np.diag(sv[:kv_rank]) @ vt[:kv_rank]).T  # S_r V_r^T, stored (in, out)
        kv_up = u[:, :kv_rank].T
    dt = dtype or p["q"].dtype
    out = {k: v for k, v in p.items() if k not in ("q", "k", "v")}
    dn_cols = mk.shape[1]
    out.update(q_rope=jnp.asarray(q_rope, dt), kv_down=jnp.asarray(kv_down, dt), k_rope=jnp.asarray(k_rope, dt),
               v_up=jnp.asarray(kv_up[:, dn_cols:], dt))
    if nk:  # NoPE query/key parts exist only when some rotated key heads lost RoPE
        out.update(q_nope=jnp.asarray(wq, dt), k_up=jnp.asarray(kv_up[:, :dn_cols], dt))
    return out


def upcycle(cfg: ModelConfig, params: dict, *, rope_heads: int, kv_rank: int | None = None, init: str = "pca",
            covs: Sequence[np.ndarray] | None = None, balance_kv: bool = True) -> tuple[ModelConfig, dict]:
    """``(mla_cfg, mla_params)``: every layer of a GQA model converted (module docstring). ``rope_heads =
    num_kv_heads`` and ``kv_rank=None`` is TransMLA's exact rewrite (same KV bytes, same logits); fewer RoPE heads /
    a lower rank reduce the cache. ``covs``: per-layer :func:`kv_covariance` (required by ``init="pca"``)."""
    new_cfg = mla_config(cfg, rope_heads, kv_rank, init)
    if covs is not None and len(covs) != cfg.num_layers:
        raise ValueError(f"covs has {len(covs)} entries for {cfg.num_layers} layers")
    if init == "pca" and covs is None:
        raise ValueError("init='pca' (TransMLA) needs calibration statistics: pass covs=kv_covariance(...)")
    layers = tuple(upcycle_layer(cfg, p, rope_heads, new_cfg.mla_kv_rank, init, None if covs is None else covs[i],
                                 balance_kv) for i, p in enumerate(params["layers"]))
    return new_cfg, {**params, "layers": layers}


ATTN_KEYS = ("q_nope", "q_rope", "kv_down", "k_rope", "k_up", "v_up", "o")


def attention_params(params: dict) -> tuple[dict, ...]:
    """The MLA attention weights of every layer (what distillation trains)."""
    return tuple({k: p[k] for k in ATTN_KEYS if k in p} for p in params["layers"])


def merge_attention(params: dict, attn: Sequence[dict]) -> dict:
    """``params`` (a GQA or MLA model) with every layer's attention replaced by ``attn`` (MLA weights); the other
    weights (embedding, norms, MLPs) are shared."""
    layers = tuple({**{k: v for k, v in p.items() if k not in ("q", "k", "v")}, **a}
                   for p, a in zip(params["layers"], attn))
    return {**params, "layers": layers}


# ------------------------------------------------------------------------------------------------- save / load


def _cfg_to_json(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _cfg_from_json(d: dict) -> ModelConfig:
    d = dict(d)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"model config has unknown fields {unknown}")
    d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
    for k in ("eos_token_ids", "layer_types"):
        d[k] = tuple(d.get(k, ()))
    return ModelConfig(**d).validate()


def save_model(path: str, cfg: ModelConfig, params: dict, *, tokenizer: str | None, prompt_style: str = "plain",
               info: dict | None = None) -> None:
    """Writes a loadable model directory (``load_pretrained(path)``): params with orbax and ``kvjax_model.json`` (the
    config — ``attention_type`` says MLA —, the tokenizer's source model name (an embedded model's, or None: the
    model is then used without text tasks), parameter count, ``info``). Written
    to ``path.tmp`` and renamed: a crash never leaves a half-written model under ``path``."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.path.abspath(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    host = jax.tree_util.tree_map(np.asarray, params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), host)
    ckptr.wait_until_finished()
    meta = {"format": FORMAT, "version": 1, "config": _cfg_to_json(cfg), "attention_type": cfg.attention_type,
            "tokenizer": tokenizer, "prompt_style": prompt_style,
            "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(host))), "info": info or {}}
    with open(os.path.join(tmp, MODEL_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=str)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE))


def load_model(path: str, dtype=jnp.float32) -> tuple[ModelConfig, dict, dict]:
    """``(cfg, params, meta)`` of a directory written by :func:`save_model`, checked (format, parameter count, every
    layer's weight shapes against the config)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.path.abspath(path)
    try:
        with open(os.path.join(path, MODEL_FILE)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model {path}: {MODEL_FILE} unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"model {path}: {MODEL_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = _cfg_from_json(meta["config"])
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    except Exception as e:  # noqa: BLE001 (orbax raises many types for damaged files)
        raise ValueError(f"model {path}: params are corrupt or missing ({type(e).__name__}: {str(e)[:200]})") from None
    n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    if n != meta.get("num_params"):
        raise ValueError(f"model {path} is corrupt: {n} parameters, {MODEL_FILE} says {meta.get('num_params')}")
    params = {k: v for k, v in params.items()}
    params["layers"] = tuple(params["layers"])
    if len(params["layers"]) != cfg.num_layers:
        raise ValueError(f"model {path}: {len(params['layers'])} layers of params, the config says {cfg.num_layers}")
    if cfg.attention_type == "mla":
        r, dr, hq, dh = cfg.mla_kv_rank, cfg.mla_rope_dim, cfg.num_heads, cfg.head_dim
        want = {"kv_down": (cfg.hidden_size, r), "k_rope": (cfg.hidden_size, dr), "v_up": (r, hq * dh),
                "q_rope": (cfg.hidden_size, hq * dr)}
        if cfg.mla_nope_dim:
            want.update(k_up=(r, hq * cfg.mla_nope_dim), q_nope=(cfg.hidden_size, hq * cfg.mla_nope_dim))
        for i, p in enumerate(params["layers"]):
            for k, shape in want.items():
                if tuple(np.shape(p.get(k))) != shape:
                    raise ValueError(f"model {path}: layer {i} weight {k} has shape {np.shape(p.get(k))}, the MLA "
                                     f"config needs {shape}")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return cfg, params, meta
