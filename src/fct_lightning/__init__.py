"""fct-lightning: update embedding models in retrieval systems without re-embedding the gallery.

The Python API (:mod:`fct_lightning.api`): :func:`fit_transformation` trains h on arrays of embeddings and
:func:`transform` maps a gallery with it; :func:`fit_linear` and :func:`fit_procrustes`
(:mod:`fct_lightning.models.closed_form`) solve a least-squares or orthogonal h in closed form, on arrays or on a
store's spaces. They are imported on first use, so that ``import fct_lightning.store`` (numpy and pyarrow only) does
not load torch and Lightning.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["fit_linear", "fit_procrustes", "fit_transformation", "transform"]
_CLOSED_FORM = ("fit_linear", "fit_procrustes")


def __getattr__(name: str) -> Any:
    if name in _CLOSED_FORM:
        from fct_lightning.models import closed_form

        return getattr(closed_form, name)
    if name in __all__:
        from fct_lightning import api

        return getattr(api, name)
    raise AttributeError(f"module 'fct_lightning' has no attribute {name!r}")
