"""The compression-transform API: methods are pure transforms of the immutable KV state.

A method is a small frozen dataclass (its fields are its typed hyper-parameters, defaulting to the paper's values)
registered by name with :func:`register`. It can act at three moments:

* ``prefill(state, obs, ctx) -> (state, obs)``: once, after the prompt was prefilled (one-shot eviction such as
  SnapKV, quantization of the prompt's cache). ``obs`` are the observations the model returned for the prompt (one
  dict per layer, see :mod:`kvjax.attention`), in the cache's slot order. A method that moves slots must return the
  observations re-ordered the same way (the helpers in :mod:`kvjax.compress.evict` do), so a later method of a chain
  still sees them aligned.
* ``chunk(state, obs, ctx) -> (state, obs)``: between the chunks of a chunked prefill (bounded peak memory: Locret,
  EpiCache). Defaults to ``prefill``.
* ``decode(state, obs, ctx) -> state``: inside the jitted decode loop after every ``every`` steps (streaming eviction:
  StreamingLLM, H2O, Scissorhands). Must keep shapes static. ``obs`` are the observations of the step the hook runs
  on only, so a method that accumulates per-step attention must use ``every = 1`` (all kvjax methods do).

What a method needs from the model is declared by ``observe()`` (for prefill) and ``decode_observe()`` (per decode
step), so the model computes only those statistics. ``kind`` says what the method leaves: ``"dense"`` caches (eviction,
merging), ``"ragged"`` ones (:class:`~kvjax.state.RaggedKV`: float, heads of different lengths without padding; a
chain converts them exactly to dense before a method that needs dense caches) or ``"quantized"``/``"lowrank"`` ones; a method that needs dense caches refuses to run after one that leaves
another kind (:class:`Chain` checks this when it is built).

Budgets are in tokens per layer (``budget``) unless a method says otherwise; :func:`budget_from_bytes` converts a
byte budget. Per-layer allocations (PyramidKV, CAKE, D2O) and per-head raggedness live in the state itself: each layer
has its own capacity and every head its own ``fill``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from kvjax.attention import Observe
from kvjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Context:
    """What a transform may consult besides the state and the observations."""

    cfg: ModelConfig
    decode_room: int = 0  # free slots every compressed layer must keep for tokens decoded afterwards
    params: Any = None  # model params (trained scorers, methods that re-project keys)
    prompt_len: int = 0  # tokens in the prefilled prompt (for budget checks)


def merge_observe(*obs: Observe) -> Observe:
    return Observe(window=max([o.window for o in obs] or [0]), colsum=any(o.colsum for o in obs),
                   inputs=any(o.inputs for o in obs), qmax=any(o.qmax for o in obs),
                   massive=max([o.massive for o in obs] or [0]), queries=any(o.queries for o in obs))


class Method:
    """Base class of every compression method (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = "identity"
    kind: ClassVar[str] = "dense"  # what the method leaves in the state
    # One of FAMILIES, for tables and plots; "" = derived by method_family() from kind and phases.
    family: ClassVar[str] = ""
    needs_dense: ClassVar[bool] = True  # it reads/gathers float keys and values
    # Kinds of non-dense caches the method also accepts before it in a chain (a quantizer quantizing the payload of
    # xKV / MiniCache / ThinK layers: ("crosslayer", "channel")); such layers reach its prefill as they are.
    also_accepts: ClassVar[tuple[str, ...]] = ()
    # A decode-time method whose decode phase also runs on the quantized layers a later quantizer of the chain leaves
    # (LaCache on per-token int8/int4 caches); it checks those quantizers in check_followers.
    decodes_quantized: ClassVar[bool] = False
    # It runs on MLA latent caches (kvjax.state.LatentKV): needs only scores from the attention's observations and
    # positions, and gathers slots with gather_layer (SnapKV). Others are refused on an MLA model (check_latent).
    latent_ok: ClassVar[bool] = False
    every: int = 1  # decode hook period (only methods with a decode phase use it)
    # The decode phase accepts a StackedLayers cache (it maps over layers with evict.map_decode_layers), so the decode
    # loop need not unstack the cache around every hook.
    stacked_decode: ClassVar[bool] = False

    def observe(self) -> Observe:
        return Observe()

    def decode_observe(self) -> Observe:
        return Observe()

    def has_decode(self) -> bool:
        return type(self).decode is not Method.decode

    def validate(self, ctx: Context) -> None:
        """Raises ValueError for hyper-parameters that cannot work with this model/prompt (budgets, windows)."""

    def check_followers(self, later: tuple["Method", ...]) -> None:
        """Raises ValueError when a method that comes after this one in a chain cannot work with it (called by
        :class:`Chain` when it is built)."""

    def prefill(self, state, obs, ctx: Context):
        return state, obs

    def chunk(self, state, obs, ctx: Context):
        return self.prefill(state, obs, ctx)

    def decode(self, state, obs, ctx: Context):
        return state

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)) \
            if dataclasses.is_dataclass(self) else ""
        return f"{self.name}({fields})"


@dataclasses.dataclass(frozen=True)
class Identity(Method):
    """The uncompressed full cache (the baseline)."""

    name: ClassVar[str] = "full"


def check_latent(method: "Method", cfg) -> None:
    """One-line error when ``method`` cannot run on the latent cache of an MLA model (``cfg.attention_type``)."""
    if getattr(cfg, "attention_type", "gqa") != "mla":
        return
    members = method.methods if isinstance(method, Chain) else (method,)
    bad = [m.name for m in members if not (isinstance(m, Identity) or m.latent_ok)]
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot run on an MLA model's latent cache (it reads per-head keys/values "
                         "or observations MLA does not provide); methods that can: snapkv")


@dataclasses.dataclass(frozen=True)
class Chain(Method):
    """Applies methods in order, e.g. ``chain(snapkv(budget=256), kivi(bits=2))``."""

    methods: tuple[Method, ...] = ()
    name: ClassVar[str] = "chain"

    def __post_init__(self):
        if not self.methods:
            raise ValueError("chain() needs at least one method")
        left = "dense"
        for j, m in enumerate(self.methods):
            if m.needs_dense and left not in ("dense", "ragged") + m.also_accepts:  # ragged converts exactly to dense
                raise ValueError(f"{m.name} needs a dense (float) cache but runs after a method that leaves a {left} "
                                 f"cache; put {m.name} before it in the chain")
            m.check_followers(self.methods[j + 1:])
            bad = ("ragged", "channel", "crosslayer") + (() if m.decodes_quantized else ("quantized",))
            later = [n.kind for n in self.methods[j + 1:] if n.kind in bad]
            if m.has_decode() and m.needs_dense and later:
                raise ValueError(f"{m.name} evicts during decoding from dense caches but a later method of the chain "
                                 f"leaves {later[0]} ones; put {m.name} after it")
            if m.kind != "dense":
                left = m.kind
        decoders = [m for m in self.methods if m.has_decode()]
        if len({m.every for m in decoders}) > 1:
            raise ValueError("methods with decode phases in one chain must share the same `every`")

    @property
    def kind(self) -> str:  # type: ignore[override]
        left = "dense"
        for m in self.methods:
            left = "dense" if m.needs_dense and left == "ragged" else left  # converted before m
            left = m.kind if m.kind != "dense" else left
        return left

    @property
    def every(self) -> int:  # type: ignore[override]
        return next((m.every for m in self.methods if m.has_decode()), 1)

    @property
    def stacked_decode(self) -> bool:  # type: ignore[override]
        return all(m.stacked_decode for m in self.methods if m.has_decode())

    @property
    def jittable(self) -> bool:
        return all(getattr(m, "jittable", True) for m in self.methods)

    def observe(self) -> Observe:
        return merge_observe(*(m.observe() for m in self.methods))

    def decode_observe(self) -> Observe:
        return merge_observe(*(m.decode_observe() for m in self.methods))

    def has_decode(self) -> bool:
        return any(m.has_decode() for m in self.methods)

    def validate(self, ctx: Context) -> None:
        for m in self.methods:
            m.validate(ctx)

    def prefill(self, state, obs, ctx):
        for m in self.methods:
            state, obs = m.prefill(densify(state) if m.needs_dense else state, obs, ctx)
        return state, obs

    def chunk(self, state, obs, ctx):
        for m in self.methods:
            state, obs = m.chunk(densify(state) if m.needs_dense else state, obs, ctx)
        return state, obs

    def decode(self, state, obs, ctx):
        for m in self.methods:
            if m.has_decode():
                state = m.decode(state, obs, ctx)
        return state

    def describe(self) -> str:
        return " -> ".join(m.describe() for m in self.methods)


FAMILIES = ("eviction", "decode-time eviction", "merging", "quantization", "composed")


def method_family(method: Method | type[Method]) -> str:
    """The family a method belongs to (plots give each its own marker): its ``family`` if set, else ``"composed"``
    for chains, ``"full"`` for the full cache, ``"quantization"`` for methods that leave a non-dense cache,
    ``"decode-time eviction"`` for methods with a decode phase and ``"eviction"`` for the rest."""
    cls = method if isinstance(method, type) else type(method)
    if cls.family:
        return cls.family
    if issubclass(cls, Chain):
        return "composed"
    if issubclass(cls, Identity):
        return "full"
    if cls.kind != "dense":
        return "quantization"
    return "decode-time eviction" if cls.decode is not Method.decode else "eviction"


def densify(state):
    """``state`` with its ragged layers (:class:`~kvjax.state.RaggedKV`) replaced by their exact padded
    :class:`~kvjax.state.DenseKV` views (observations of ragged layers are already in the views' slot order)."""
    from kvjax.state import RaggedKV, as_dense_layer  # noqa: PLC0415

    if not isinstance(state.layers, tuple) or not any(isinstance(layer, RaggedKV) for layer in state.layers):
        return state
    return state.replace(layers=tuple(as_dense_layer(layer) for layer in state.layers))


def chain(*methods: Method) -> Method:
    """Composes methods left to right (a single method is returned as is)."""
    return methods[0] if len(methods) == 1 else Chain(tuple(methods))


_REGISTRY: dict[str, type[Method]] = {"full": Identity}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes ``cls`` available to :func:`get_method` under ``cls.name``.

    Re-running the definition of the same class (same module and qualified name, e.g. a notebook cell executed
    again) replaces the earlier version; another class under a taken name is refused."""
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {cls.name!r} is already registered (by {old.__module__}.{old.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_method(name: str, **hparams) -> Method:
    """Builds a registered method from its name and hyper-parameters (validated; unknown ones raise)."""
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown compression method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    bad = sorted(set(hparams) - valid)
    if bad:
        raise ValueError(f"method {name!r} has no hyper-parameter(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    check_hyperparameter_types(cls, hparams)
    return cls(**hparams)


def _type_ok(value, hint) -> bool | None:
    """Whether ``value`` fits the annotation ``hint`` (None: the annotation is not one this check understands)."""
    import math  # noqa: PLC0415
    import numbers  # noqa: PLC0415
    import types  # noqa: PLC0415
    import typing  # noqa: PLC0415

    if hint is typing.Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        answers = [_type_ok(value, h) for h in typing.get_args(hint)]
        return True if any(a is True for a in answers) else (None if None in answers else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and not (isinstance(value, float) and math.isnan(value)))
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        return isinstance(value, (tuple, list))
    return None


def check_hyperparameter_types(cls: type, hparams: dict) -> None:
    """Refuses hyper-parameters whose value does not fit the field's annotation (``budget="abc"``, a float budget,
    a NaN ratio): one clear error naming the method, the field, the value and the expected type."""
    import typing  # noqa: PLC0415

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 (annotations this check cannot resolve are left to the method's own checks)
        return
    for k, v in hparams.items():
        hint = hints.get(k)
        if hint is None or _type_ok(v, hint) is not False:
            continue
        want = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise ValueError(f"method {cls.name!r}: {k}={v!r} is not a valid {want}{' (NaN)' if v != v else ''}")


def _import_all() -> None:
    """Imports every method module so that their ``@register`` decorators run."""
    import importlib
    import pkgutil

    import kvjax.compress as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "evict"):
            importlib.import_module(f"kvjax.compress.{mod.name}")


def budget_from_bytes(state_layer_bytes_per_token: int, nbytes_budget: int) -> int:
    """Tokens per layer that fit ``nbytes_budget`` bytes given the bytes one token costs in one layer."""
    if state_layer_bytes_per_token <= 0:
        raise ValueError("bytes per token must be positive")
    return max(1, nbytes_budget // state_layer_bytes_per_token)


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Clear error for a hyper-parameter that must be positive (or non-negative)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
