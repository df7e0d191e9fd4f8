"""Tokenizers built from a GGUF file's metadata with the ``tokenizers`` package (no model hub, no ``transformers``).

Two vocabulary kinds are supported, as llama.cpp names them in ``tokenizer.ggml.model``:

* ``gpt2`` -- byte-level BPE over the file's tokens and merges (SmolLM2, Qwen2, Llama 3). The pre-tokenizer is
  chosen by ``tokenizer.ggml.pre``: ``smollm`` is ``Digits(individual_digits=True)`` then ``ByteLevel``; ``gpt-2``
  and ``default`` plain ``ByteLevel``; ``qwen2`` and ``llama-bpe`` their split regexes then ``ByteLevel``.
* ``llama`` -- sentencepiece-style BPE (Gemma 3). The file has tokens, scores and types but no merges; the merges are
  rebuilt from the vocabulary (every split of a token into two tokens, ranked by the merged token's position in the
  file, which is its score order), tokens made only of spaces are respelled with ``▁`` as sentencepiece spells them,
  and unknown characters fall back to the ``<0xNN>`` byte tokens. Building the merges of Gemma's 262K vocabulary
  takes about 3 s (loading a saved ``tokenizer.json`` of it would take as long, so nothing is cached).

Control tokens (GGUF type 3, e.g. ``<|im_start|>``, ``<start_of_turn>``) are special tokens and user-defined ones
(type 4, e.g. ``\\n\\n`` in Gemma) plain added tokens: both are matched whole in the text, as llama.cpp does.

Chat templates (``tokenizer.chat_template``) are rendered with jinja2 the way transformers' ``apply_chat_template``
renders them: a sandboxed environment (``ImmutableSandboxedEnvironment``) with ``trim_blocks`` and ``lstrip_blocks``,
the ``loopcontrols`` extension and ``{% generation %}`` blocks, ``raise_exception``, a ``tojson`` that does not escape
HTML, ``strftime_now``, and the special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) as
variables. The text is exactly transformers' ``apply_chat_template(..., tokenize=False)``.

A GGUF without a template but with Gemma's turn tokens (the Gemma 3 270M *base* model kvjax ships has none) gets
kvjax's own Gemma turn template, :data:`GEMMA_TURNS_TEMPLATE` (Gemma's documented format: ``<bos>``, turns
``<start_of_turn>{user|model}\\n...<end_of_turn>\\n``, a system message prepended to the first user turn, roles
alternating), rendered the same way; ``Tokenizer.chat_template_source`` says which was used.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from kvjax.config import UnsupportedConfigError

__all__ = ["Tokenizer"]

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of byte-level vocabularies (as in transformers' GGUF tokenizer mapping and llama.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                      "qwen2": _QWEN2_SPLIT}

GEMMA_TURNS_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- set first_prefix = messages[0]['content'] + '\\n\\n' %}\n"
    "    {%- set turns = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set first_prefix = '' %}\n"
    "    {%- set turns = messages %}\n"
    "{%- endif %}\n"
    "{%- for message in turns %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Gemma conversations must alternate user/assistant/user/..., starting with user '\n"
    "                            '(after an optional system message)') }}\n"
    "    {%- endif %}\n"
    "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}\n"
    "    {{- '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}\n")


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str):
    """A jinja2 template compiled in an environment set up as transformers sets up its chat-template environment."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore attributes (no reach into interpreter internals)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(template)


def _special_tokens(tokens: Sequence[str], types: Sequence[int]) -> tuple[list[AddedToken], list[AddedToken]]:
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    return control, user


def _byte_level_backend(meta: Mapping[str, Any]) -> _Backend:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) from the GGUF tokens and merges."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ValueError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed GGUF merge {m!r}")
        merges.append((left, right))
    backend = _Backend(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("gpt-2", "gpt2", "default"):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _BYTE_LEVEL_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise UnsupportedConfigError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: smollm, gpt-2, default, "
            f"{', '.join(_BYTE_LEVEL_SPLITS)}")
    backend.decoder = decoders.ByteLevel()
    control, user = _special_tokens(tokens, meta.get("tokenizer.ggml.token_type") or [])
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return backend


def _spm_merges(tokens: Sequence[str], types: Sequence[int], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece BPE vocabulary: every split of a token into two tokens.

    Ranked by the merged token's position in the file: sentencepiece merges the pair whose result scores highest, and
    Gemma's normal tokens score minus their position (its user-defined tokens score -1000 but are ranked by position
    too, as ``transformers`` does). Among the splits of one token, the longer left piece comes first (also as
    ``transformers`` does, so both tokenizers agree). Only normal and user-defined tokens take part: control, byte
    and unused tokens never come out of a merge.
    """
    mergeable = {t for t, ty in zip(tokens, types) if ty in (_NORMAL, _USER_DEFINED)}
    merges: list[tuple[str, str]] = []
    append = merges.append
    for i, (tok, ty) in enumerate(zip(tokens, types)):  # in file order = rank order
        if ty not in (_NORMAL, _USER_DEFINED) or len(tok) < 2 or vocab.get(tok) != i:
            continue
        for k in range(len(tok) - 1, 0, -1):
            left = tok[:k]
            if left in mergeable:
                right = tok[k:]
                if right in mergeable:
                    append((left, right))
    return merges


def _spm_backend(meta: Mapping[str, Any]) -> _Backend:
    """Sentencepiece-style BPE (``tokenizer.ggml.model == "llama"``) from GGUF tokens, scores and types."""
    tokens = [("\u2581" * len(t) if " " in t and not t.strip() else t) for t in meta["tokenizer.ggml.tokens"]]
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = _Backend(models.BPE(vocab, _spm_merges(tokens, types, vocab), unk_token=unk, fuse_unk=True,
                                  byte_fallback=True))
    norms = [normalizers.Prepend("\u2581")] if add_prefix else []
    backend.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "\u2581")])
    decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decs.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decs)
    control, user = _special_tokens(tokens, types)
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return backend


class Tokenizer:
    """Encoder/decoder of a GGUF model's vocabulary, with its special tokens and chat format.

    Build one with :meth:`from_gguf`. ``encode`` never adds BOS unless asked (``add_bos=True``);
    :attr:`add_bos_token` says whether the model expects it (True for Gemma 3, False for SmolLM2, whose "BOS" is
    ``<|im_start|>``). A BOS is never doubled: ``encode(text, add_bos=True)`` leaves text that already starts with the
    BOS token alone.
    """

    def __init__(self, backend: _Backend, *, bos_id: int | None, eos_ids: tuple[int, ...], pad_id: int | None,
                 add_bos_token: bool, chat_format: str | None, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None, name: str = "") -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id
        self.add_bos_token = add_bos_token
        self.chat_format = chat_format
        self.chat_template_source = "gguf" if chat_template else None
        if not chat_template and chat_format == "gemma":
            chat_template, self.chat_template_source = GEMMA_TURNS_TEMPLATE, "kvjax-gemma-turns"
        self.chat_template = chat_template or None
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token ... as the template sees them
        self.name = name
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike | Mapping[str, Any]) -> "Tokenizer":
        """Builds the tokenizer of a GGUF file, given its path or its :func:`load_gguf_metadata` dict.

        Takes about 0.2 s for SmolLM2 and 3 s for Gemma 3 (rebuilding 515K merges from its 262K tokens).

        Raises:
            ValueError: the metadata has no usable tokenizer (the message says what is missing).
            kvjax.config.UnsupportedConfigError: the tokenizer kind or pre-tokenizer is not supported.
        """
        if isinstance(path_or_metadata, Mapping):
            meta, name = path_or_metadata, str(path_or_metadata.get("general.name", ""))
        else:
            from kvjax.checkpoints.gguf import load_gguf_metadata

            meta, name = load_gguf_metadata(path_or_metadata), os.fspath(path_or_metadata)
        if not meta.get("tokenizer.ggml.tokens"):
            raise ValueError(f"GGUF metadata of {name or 'the file'} has no tokenizer.ggml.tokens")
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _byte_level_backend(meta)
        elif kind == "llama":
            backend = _spm_backend(meta)
        else:
            raise UnsupportedConfigError(
                f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
                "'llama' sentencepiece BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(f"tokenizer built from {name or 'GGUF metadata'} has "
                             f"{backend.get_vocab_size(with_added_tokens=True)} ids, the file {len(tokens)} tokens")
        from kvjax.checkpoints.gguf import stop_token_ids

        template = meta.get("tokenizer.chat_template") or ""
        chat_format = None
        if "<|im_start|>" in tokens[:1024] or "<|im_start|>" in template:
            chat_format = "chatml"
        elif "<start_of_turn>" in tokens[:1024]:
            chat_format = "gemma"
        bos = meta.get("tokenizer.ggml.bos_token_id")
        special = {}  # the token strings a template sees, as transformers' GGUF conversion names them
        for var, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                         ("pad_token", "padding")):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(i, int) and 0 <= i < len(tokens):
                special[var] = tokens[i]
        return cls(backend, bos_id=bos, eos_ids=stop_token_ids(meta),
                   pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                   chat_format=chat_format, chat_template=template, special_tokens=special, name=name)

    # -- encoding -------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (including special tokens)."""
        return self._vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become their single ids.

        With ``add_bos=True`` the BOS id is prepended unless the text already starts with it.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """:meth:`encode` of several texts (in parallel inside ``tokenizers``)."""
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            out = [ids if ids and ids[0] == self.bos_id else [self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens included unless ``skip_special_tokens``)."""
        ids = [int(i) for i in ids]
        n = self._vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` (without BOS)."""
        return len(self.encode(text))

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (as the vocabulary spells it), or ``None``."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (as the vocabulary spells it), or ``None``."""
        return self.backend.id_to_token(int(token_id))

    # -- chat -----------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text of a conversation: the model's chat template (from the GGUF metadata) rendered with jinja2
        exactly as transformers' ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` renders
        it (see the module docstring), special tokens included as the template writes them (Gemma's starts with
        ``<bos>``; :meth:`encode` with ``add_bos=True`` never doubles it). ``kwargs`` reach the template as variables.

        Raises:
            ValueError: the tokenizer has no chat template, the conversation is empty or malformed, or the template
                refuses it
                (its ``raise_exception`` message, e.g. Gemma's roles that do not alternate).
        """
        import jinja2

        msgs = []
        for m in messages:
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise ValueError(f"each message must be a dict with str 'role' and 'content', got {m!r}")
            msgs.append(dict(m))
        if not msgs:  # (as transformers)
            raise ValueError("cannot apply a chat template to an empty conversation; give at least one message")
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.name!r} has no chat template (tokenizer.chat_template)")
        variables = {**self.special_tokens, **kwargs}
        try:
            return compile_chat_template(self.chat_template).render(
                messages=msgs, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template of {self.name or 'the tokenizer'}: {e}") from None

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, chat_format={self.chat_format!r})")
