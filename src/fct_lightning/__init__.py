"""fct-lightning: update embedding models in retrieval systems without re-embedding the gallery."""

__version__ = "0.1.0"
