"""dhsa-export: deploy long-context LLaMA-family models with Dynamic Hierarchical Sparse Attention.

Importing the package is cheap: heavy backends load inside their own subpackages.
"""

from .config import DHSAConfig
from .errors import DHSAError

__version__ = "0.1.0"
__all__ = ["DHSAConfig", "DHSAError", "__version__"]
