"""KV-cache compression methods as transforms of the KV state; see :mod:`kvjax.compress.base` for the API and
:mod:`kvjax.compress.scorer` for the short path to a new eviction method (a scoring function)."""
from kvjax.compress.base import (FAMILIES, Chain, Context, Identity, Method, available_methods, budget_from_bytes,
                                 chain, get_method, method_family, register)
from kvjax.compress.scorer import ScorerMethod

__all__ = ["FAMILIES", "Chain", "Context", "Identity", "Method", "ScorerMethod", "available_methods",
           "budget_from_bytes", "chain", "get_method", "method_family", "register"]
