"""Load torchtune's own recipe classes so ours can subclass them (never copy them).

torchtune's ``recipes`` package refuses to be imported, but its files can be loaded by path.
Each file is loaded once and registered in ``sys.modules`` under a private name, so pickling
and repeated imports see one module.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torchtune

RECIPES_DIR = Path(torchtune.__file__).resolve().parent.parent / "recipes"


def load_recipe_module(stem: str) -> ModuleType:
    """Load ``recipes/<stem>.py`` of the installed torchtune (e.g. "lora_finetune_single_device")."""
    name = f"_torchtune_recipe_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    path = RECIPES_DIR / f"{stem}.py"
    if not path.is_file():
        raise ImportError(f"torchtune recipe file not found: {path} (is torchtune==0.6.1 installed?)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
