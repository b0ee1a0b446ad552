"""Packaged config names, and the tune-xgb ls / cp commands."""

import subprocess
import sys
from pathlib import Path

import pytest

from torchtune_xgb.config.names import packaged_configs, resolve_config, resolve_config_arg


def test_config_names_resolve(tmp_path):
    configs = packaged_configs()
    assert "smollm2_135m_xgblora" in configs and configs["smollm2_135m_xgblora"].is_file()
    assert resolve_config("smollm2_135m_xgblora") == str(configs["smollm2_135m_xgblora"])
    assert resolve_config("smollm2_135m_xgblora.yaml") == str(configs["smollm2_135m_xgblora"])
    own = tmp_path / "mine.yaml"
    own.write_text("a: 1\n")
    assert resolve_config(str(own)) == str(own)  # a path that exists wins
    assert resolve_config_arg(["x", "--config", "smollm2_135m_xgblora", "a=1"])[2].endswith("smollm2_135m_xgblora.yaml")
    with pytest.raises(FileNotFoundError, match="--config"):
        resolve_config("no_such_config")


def test_no_config_name_shadows_torchtune():
    from torchtune._recipe_registry import get_all_recipes

    theirs = {c.name for r in get_all_recipes() for c in r.configs}
    assert not theirs & set(packaged_configs())
    assert "xgblora_finetune" not in {r.name for r in get_all_recipes()}


def test_tune_xgb_ls_and_cp(tmp_path):
    exe = str(Path(sys.executable).parent / "tune-xgb")
    out = subprocess.run([exe, "ls"], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert "xgblora_finetune" in out and "smollm2_135m_xgblora" in out
    subprocess.run([exe, "cp", "smollm2_135m_xgblora", str(tmp_path / "my.yaml")], check=True, capture_output=True)
    assert (tmp_path / "my.yaml").read_text() == packaged_configs()["smollm2_135m_xgblora"].read_text()
    again = subprocess.run([exe, "cp", "smollm2_135m_xgblora", str(tmp_path / "my.yaml")], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
