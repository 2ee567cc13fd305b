"""Training of the small auxiliary networks DHSA uses (the backbone always stays frozen).

- :func:`dhsa_export.train.boundaries.train_boundaries`: the chunk-boundary predictor of the
  ``dynamic`` pattern, trained on attention-mass labels of the frozen model.
"""

from .boundaries import train_boundaries

__all__ = ["train_boundaries"]
