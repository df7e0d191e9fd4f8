"""kvjax: KV-cache compression research for JAX/Pallas.

Core pieces: :class:`kvjax.Model` (pure prefill/decode over an immutable :class:`kvjax.KVState`),
:func:`kvjax.nbytes` (the real byte count of a state), loaders in :mod:`kvjax.checkpoints`.
"""
from kvjax.attention import Observe
from kvjax.config import ModelConfig, UnsupportedConfigError, config_from_hf, load_config
from kvjax.model import Model
from kvjax.state import DenseKV, KVState, init_state, kv_nbytes, nbytes

__all__ = ["DenseKV", "KVState", "Model", "ModelConfig", "Observe", "UnsupportedConfigError", "config_from_hf",
           "init_state", "kv_nbytes", "load_config", "nbytes"]
__version__ = "0.1.0"
