"""Where the plugin keeps generated files (converted models, generated datasets).

Everything generated goes under one cache root so that nothing large lands in a repository:
``$TORCHTUNE_XGB_CACHE`` if set, else ``~/.cache/torchtune_xgb``. Configs refer to it with the
OmegaConf resolver ``${xgb_cache:NAME}``, registered when the recipe module is imported.
"""

import os
import warnings
from pathlib import Path

from omegaconf import OmegaConf

CACHE_ENV = "TORCHTUNE_XGB_CACHE"


def cache_root() -> Path:
    """The cache root as an absolute path (not created)."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "torchtune_xgb")
    return Path(root).expanduser().resolve()


def cache_path(name: str = "") -> Path:
    """``cache_root() / name``."""
    return cache_root() / name if name else cache_root()


def register_resolvers() -> None:
    """Make ``${xgb_cache:NAME}`` usable in YAML configs (idempotent)."""
    if not OmegaConf.has_resolver("xgb_cache"):
        with warnings.catch_warnings():
            # omegaconf 2.4 deprecates the name; the call works on every 2.x that torchtune accepts
            warnings.simplefilter("ignore", UserWarning)
            OmegaConf.register_new_resolver("xgb_cache", lambda name="": str(cache_path(name)))
