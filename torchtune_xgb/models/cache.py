"""Where the plugin keeps generated files (converted models, generated datasets).

Everything generated goes under one cache root so that nothing large lands in a repository:
``$TORCHTUNE_XGB_CACHE`` if set, else ``~/.cache/torchtune_xgb``. Configs refer to it with the
OmegaConf resolver ``${xgb_cache:NAME}``, registered when the recipe module is imported.

``make`` sets ``TORCHTUNE_XGB_CACHE`` to the checkout's ``.cache``; a ``tune run`` elsewhere
without it looks in ``~/.cache/torchtune_xgb``. A model missing from the cache the run uses
stops the run with one line that names the directory, the ``tune-xgb prepare`` command, and
a prepared copy in the other location if there is one (:func:`torchtune_xgb.models.prepare.check_prepared`).
"""

import os
import warnings
from pathlib import Path
from typing import List

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


DEFAULT_ROOT = Path("~", ".cache", "torchtune_xgb")


def known_cache_roots() -> List[Path]:
    """The cache roots a model may have been prepared into: the current one, the default one, and
    the ``.cache`` of the checkout this package is installed from (what ``make`` uses)."""
    roots = [cache_root(), DEFAULT_ROOT.expanduser().resolve()]
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "Makefile").is_file():
        roots.append(checkout / ".cache")
    unique: List[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique
