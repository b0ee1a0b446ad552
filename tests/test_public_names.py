"""The names configs and user code refer to are importable from the package's top level, load
lazily, and are the very objects the subpackages define (so a config may use either path)."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import torchtune_xgb
from torchtune_xgb.eval.validation import _builder


def test_import_alone_loads_neither_torch_nor_torchtune():
    code = "import sys, torchtune_xgb; print('torch' in sys.modules, 'torchtune' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("name", torchtune_xgb.__all__)
def test_every_public_name_is_the_subpackage_object(name):
    value = getattr(torchtune_xgb, name)
    module = sys.modules[torchtune_xgb._PUBLIC[name]]
    assert value is getattr(module, name)
    assert name in dir(torchtune_xgb)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        torchtune_xgb.no_such_thing  # noqa: B018


@pytest.mark.parametrize("path", ["torchtune_xgb.arithmetic_dataset", "torchtune_xgb.data.arithmetic_dataset",
                                  "torchtune_xgb.data.arithmetic.arithmetic_dataset"])
def test_the_eval_checks_recognise_a_builder_under_any_of_its_paths(path):
    assert _builder(OmegaConf.create({"_component_": path})) is torchtune_xgb.arithmetic_dataset


def test_packaged_configs_use_the_short_names():
    from torchtune_xgb.config.names import packaged_configs

    for name, path in packaged_configs().items():
        text = path.read_text()
        assert "torchtune_xgb.models." not in text and "torchtune_xgb.data." not in text, name
