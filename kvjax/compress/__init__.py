"""KV-cache compression methods as transforms of the KV state; see :mod:`kvjax.compress.base` for the API."""
from kvjax.compress.base import (Chain, Context, Identity, Method, available_methods, budget_from_bytes, chain,
                                 get_method, register)

__all__ = ["Chain", "Context", "Identity", "Method", "available_methods", "budget_from_bytes", "chain", "get_method",
           "register"]
