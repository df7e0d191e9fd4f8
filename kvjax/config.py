"""Model configuration read from a Hugging Face ``config.json``.

Only fields that kvjax implements are accepted; a field that changes the computation and that kvjax does not
implement raises :class:`UnsupportedConfigError` instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class UnsupportedConfigError(ValueError):
    """A checkpoint asks for an architecture or a config option kvjax does not implement."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as in HF ``rope_scaling`` (types: linear, dynamic NTK, llama3)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (hashable: it is a static argument of jitted functions)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 always has it)
    sliding_window: int = 0  # 0 = full attention (Mistral's window applies to every layer)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 fields (ignored by the Llama family).
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"
    rope_local_base_freq: float = 10000.0
    query_pre_attn_scalar: float = 0.0
    final_logit_softcapping: float = 0.0
    attn_logit_softcapping: float = 0.0
    # Multi-head latent attention (MLA, an upcycled Llama-family model: kvjax.upcycle). 0 = standard GQA attention.
    mla_kv_rank: int = 0  # d_latent: width of the cached joint key/value latent per token
    mla_rope_heads: int = 0  # decoupled RoPE key: this many head_dim-wide rotated key chunks, shared by all heads
    mla_nope_dim: int = 0  # per-head query/key width without RoPE (0 or head_dim in kvjax's conversions)

    @property
    def attention_type(self) -> str:
        """``"mla"`` (cached latent + decoupled RoPE key, :mod:`kvjax.models.mla`) or ``"gqa"``."""
        return "mla" if self.mla_kv_rank else "gqa"

    @property
    def mla_rope_dim(self) -> int:
        """Width of the decoupled RoPE key cached per token (``mla_rope_heads * head_dim``)."""
        return self.mla_rope_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int:
        """Sliding window of ``layer`` in tokens (0 = global attention)."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0
        return self.sliding_window

    def validate(self) -> "ModelConfig":
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedConfigError(
                f"unsupported architecture {self.architecture!r}; kvjax supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise UnsupportedConfigError(
                f"unsupported rope_scaling type {self.rope_scaling.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise UnsupportedConfigError("layer_types must have one entry per layer")
        if self.mla_kv_rank < 0 or self.mla_rope_heads < 0 or self.mla_nope_dim < 0:
            raise UnsupportedConfigError(
                f"MLA fields must be >= 0, got mla_kv_rank={self.mla_kv_rank}, mla_rope_heads={self.mla_rope_heads}, "
                f"mla_nope_dim={self.mla_nope_dim}")
        if self.mla_kv_rank:
            if self.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
                raise UnsupportedConfigError(f"MLA attention is implemented for Llama-family models only, not "
                                             f"{self.architecture}")
            if self.mla_rope_heads < 1:
                raise UnsupportedConfigError(f"an MLA config needs mla_rope_heads >= 1, got {self.mla_rope_heads}")
            if self.sliding_window or self.attention_bias:
                raise UnsupportedConfigError("MLA attention supports neither sliding windows nor q/k/v biases")
        elif self.mla_rope_heads or self.mla_nope_dim:
            raise UnsupportedConfigError("mla_rope_heads / mla_nope_dim are set but mla_kv_rank is 0 (not an MLA model)")
        return self


# Config keys that are pure metadata or that kvjax handles implicitly; any other key must be in _HANDLED.
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache", "pad_token_id",
    "initializer_range", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "pretraining_tp", "attention_dropout", "use_return_dict", "is_decoder", "tokenizer_class", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "add_cross_attention", "tie_encoder_decoder", "_attn_implementation",
    "_attn_implementation_autoset", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "cache_implementation", "max_window_layers", "use_mrope", "task_specific_params", "finetuning_task",
    "prefix", "torchscript", "pruned_heads", "output_scores", "return_dict_in_generate", "cross_attention_hidden_size",
    "is_encoder_decoder", "tf_legacy_loss", "use_bfloat16", "num_beams", "temperature", "top_k", "top_p",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beam_groups", "diversity_penalty",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "typical_p", "encoder_no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "chunk_size", "mlp_bias_unused", "vision_config", "final_logit_softcapping_unused", "use_bidirectional_attention",
    "head_dim_unused", "rope_parameters", "rope_theta", "rope_scaling", "layer_types", "sliding_window_pattern",
    "rope_local_base_freq", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
    "sliding_window", "use_sliding_window", "_sliding_window_pattern", "attention_bias", "mlp_bias", "hidden_act", "hidden_activation",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
}


def _rope_from_hf(raw: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")  # transformers >= 5 nests theta and scaling here
    if isinstance(params, Mapping):
        if "full_attention" in params or "sliding_attention" in params:  # Gemma 3 per-layer-type parameters
            params = params.get("full_attention", {})
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if theta is None:
        theta = 10000.0
    if not scaling:
        return float(theta), RopeScaling()
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise UnsupportedConfigError(f"unsupported rope_scaling type {rtype!r}; supported: {', '.join(ROPE_TYPES)}")
    return float(theta), RopeScaling(
        rope_type=rtype,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 0) or 0),
    )


LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_layer_types(lt, n: int) -> tuple[str, ...]:
    if not isinstance(lt, (list, tuple)) or len(lt) != n:
        raise UnsupportedConfigError(f"layer_types must list one entry per layer ({n}), got {lt!r}")
    bad = sorted({x for x in lt if x not in LAYER_TYPES})
    if bad:
        raise UnsupportedConfigError(f"layer_types entries {bad} are not supported (only {', '.join(LAYER_TYPES)})")
    return tuple(lt)


def _llama_family_windows(arch: str, raw: Mapping[str, Any]) -> tuple[int, tuple[str, ...]]:
    """``(sliding_window, layer_types)`` with transformers' meaning for Llama, Mistral and Qwen2 configs.

    * Qwen2 (``Qwen2Config``): the window is ``sliding_window`` (default 4096) only when ``use_sliding_window``;
      ``layer_types`` (when given) says which layers use it, else layers ``i >= max_window_layers`` (default 28) do.
    * Mistral: ``sliding_window`` (default 4096; ``null`` = none) applies to every layer. transformers' Mistral ignores
      ``layer_types``, so a ``layer_types`` that disagrees with that is refused rather than read either way.
    * Llama has no sliding window in transformers (``sliding_window`` is unused); a ``layer_types`` asking for
      sliding layers is refused.
    """
    n = int(raw["num_hidden_layers"])
    lt = raw.get("layer_types")
    lt = None if lt is None else _check_layer_types(lt, n)
    if arch == "Qwen2ForCausalLM":
        window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) else None
        if lt is None:
            first = int(raw.get("max_window_layers", 28))
            lt = tuple("sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(n))
        if "sliding_attention" not in lt:
            return 0, ()
        if window is None or int(window) <= 0:
            raise UnsupportedConfigError(
                "layer_types has sliding_attention layers but no sliding window is active (use_sliding_window="
                f"{raw.get('use_sliding_window', False)}, sliding_window={raw.get('sliding_window', 4096)!r})")
        return int(window), lt
    if arch == "MistralForCausalLM":
        window = raw.get("sliding_window", 4096)
        window = int(window) if window else 0
        uniform = ("sliding_attention" if window else "full_attention",) * n
        if lt is not None and lt != uniform:
            raise UnsupportedConfigError(
                f"Mistral applies sliding_window={window or None} to every layer and transformers' Mistral ignores "
                f"layer_types; this config's layer_types {list(lt)} disagree (use a Ministral/Qwen2-style config)")
        return window, ()
    if lt is not None and "sliding_attention" in lt:
        raise UnsupportedConfigError(f"{arch} has no sliding-window layers in transformers, but layer_types asks for "
                                     "them")
    return 0, ()


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """Builds a :class:`ModelConfig` from the dict of a HF ``config.json``; unknown keys raise."""
    archs = raw.get("architectures") or [_MODEL_TYPES.get(raw.get("model_type", ""), raw.get("model_type", "?"))]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"unsupported architecture {arch!r}; kvjax supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    unknown = sorted(k for k in raw if k not in _IGNORED_KEYS)
    if unknown:
        raise UnsupportedConfigError(
            f"config.json has fields kvjax does not implement: {', '.join(unknown)} (refusing to ignore them)")
    if raw.get("mlp_bias"):
        raise UnsupportedConfigError("mlp_bias=True is not supported")
    if arch == "Gemma3ForCausalLM":  # HF's Gemma 3 reads only hidden_activation (a stray hidden_act is unused)
        act = raw.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if arch != "Gemma3ForCausalLM" and act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported for {arch} (only 'silu')")
    theta, scaling = _rope_from_hf(raw)
    n_heads = int(raw["num_attention_heads"])
    head_dim = raw.get("head_dim") or (256 if arch == "Gemma3ForCausalLM"  # Gemma3TextConfig's default
                                       else int(raw["hidden_size"]) // n_heads)
    window, layer_types = _llama_family_windows(arch, raw) if arch != "Gemma3ForCausalLM" else (0, ())
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    extra: dict[str, Any] = {}
    if arch == "Gemma3ForCausalLM":
        n = int(raw["num_hidden_layers"])
        if raw.get("layer_types"):
            layer_types = tuple(raw["layer_types"])
        else:
            pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
            layer_types = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n))
        window = int(raw.get("sliding_window", 4096) or 0)  # Gemma3TextConfig defaults to 4096
        local_theta = raw.get("rope_local_base_freq")
        rp = raw.get("rope_parameters")
        if isinstance(rp, Mapping) and "sliding_attention" in rp:
            local = rp["sliding_attention"] or {}
            local_theta = local.get("rope_theta", local_theta)
            if local.get("rope_type", "default") != "default":
                raise UnsupportedConfigError(
                    f"rope scaling {local.get('rope_type')!r} on Gemma 3 sliding-window layers is not supported "
                    "(kvjax scales only the global layers' RoPE)")
        bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise UnsupportedConfigError(f"Gemma 3 layer_types {bad} are not supported "
                                         "(only full_attention and sliding_attention)")
        if raw.get("rope_theta") is None and not isinstance(rp, Mapping):
            theta = 1_000_000.0  # Gemma3TextConfig's default for the global layers
        if raw.get("use_bidirectional_attention"):
            raise UnsupportedConfigError("use_bidirectional_attention=True (non-causal Gemma 3) is not supported")
        extra = dict(
            rope_local_base_freq=float(local_theta or 10000.0),
            query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or 256),  # Gemma3TextConfig's default
            final_logit_softcapping=float(raw.get("final_logit_softcapping") or 0.0),
            attn_logit_softcapping=float(raw.get("attn_logit_softcapping") or 0.0),
        )
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise UnsupportedConfigError(f"hidden_activation={act!r} is not supported for Gemma 3")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch == "Gemma3ForCausalLM")),
        attention_bias=bool(raw.get("attention_bias", False)) or arch == "Qwen2ForCausalLM",
        sliding_window=window,
        hidden_act=act,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        layer_types=layer_types,
        **extra,
    ).validate()


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Reads ``config.json`` (``path`` may be the file or its directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, Mapping):
        raise UnsupportedConfigError(f"{path} holds a {type(raw).__name__}, expected a JSON object")
    for name in REQUIRED_INT_FIELDS:
        if name not in raw:
            raise UnsupportedConfigError(f"{path}: required field {name!r} is missing")
    for name in REQUIRED_INT_FIELDS + OPTIONAL_INT_FIELDS:
        v = raw.get(name)
        if name in raw and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise UnsupportedConfigError(f"{path}: field {name}={v!r} must be a positive integer")
    try:
        return config_from_hf(raw)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UnsupportedConfigError(f"{path}: malformed field ({type(e).__name__}: {e})") from None


REQUIRED_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_INT_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
