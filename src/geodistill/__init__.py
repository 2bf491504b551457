"""geodistill: knowledge distillation with geometry-aware representational alignment.

The geometry core (:mod:`geodistill.geometry`) needs only torch and numpy; the training stack
(models, data, loop, CLI) needs the ``hf`` extra.
"""

from geodistill.geometry import (
    center,
    cka,
    cka_distance,
    gram_distance,
    normalize,
    nuclear_norm,
    procrustes_distance,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "center",
    "cka",
    "cka_distance",
    "gram_distance",
    "normalize",
    "nuclear_norm",
    "procrustes_distance",
]
