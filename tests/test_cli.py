"""``tune-xgb validate`` / ``tune-xgb path`` and the one-line "model not prepared" error. In process."""

import pytest
import yaml

from tests.e2e_fixture import tiny_config
from torchtune_xgb.cli import main
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.models import cache as model_cache
from torchtune_xgb.models import prepare

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(model_cache.CACHE_ENV, str(cache))
    monkeypatch.setattr(model_cache, "DEFAULT_ROOT", tmp_path / "home_cache")  # never the real ~/.cache
    return cache


def _tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "out")))
    return path


def test_validate_accepts_a_good_config_and_names_the_key_of_a_bad_override(tmp_path, empty_cache, capsys):
    path = _tiny_yaml(tmp_path)
    assert main(["validate", str(path)]) == 0
    assert "config is well-formed" in capsys.readouterr().out
    assert main(["validate", str(path), "boost.steps_per_round=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: boost.steps_per_round: must be an integer ≥ 1, got 0"]


def test_validate_merges_overrides_as_tune_run_does(tmp_path, empty_cache, capsys):
    path = _tiny_yaml(tmp_path)
    swap = "eval.examples._component_=torchtune_xgb.data.json_eval_examples"
    assert main(["validate", str(path), swap]) == 2  # the file's data_dir stays: one line, with the way out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: eval.examples.") and "json_eval_examples() has no argument" in err[0]
    assert "remove it with ~eval.examples." in err[0]
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"q": "1+1", "a": "2"}\n')
    # torchtune's `~key` removal, as `tune run` applies it: the generated task's keys (split, data_dir, …)
    removed = [f"~eval.examples.{k}" for k in yaml.safe_load(path.read_text())["eval"]["examples"] if k != "_component_"]
    assert main(["validate", str(path), swap, *removed, f"eval.examples.path={mine}",
                 "eval.examples.input_column=q", "eval.examples.output_column=a"]) == 0, capsys.readouterr().err
    # `block=builder` sets a component block's _component_ (torchtune's shorthand), not the whole block
    assert main(["validate", str(path), "optimizer=torch.optim.SGD"]) == 0, capsys.readouterr().err
    assert main(["validate", str(path), "no_equals_sign"]) == 2
    assert "Command-line overrides must be in the form of key=value" in capsys.readouterr().err


def test_validate_resolves_packaged_names_and_the_cache_resolver(empty_cache, capsys):
    # the packaged config uses ${xgb_cache:…}; the model is not prepared in this empty cache
    assert main(["validate", "smollm2_135m_xgblora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpointer.checkpoint_dir: model not prepared: ")
    assert str(empty_cache / MODEL) in err[0] and f"tune-xgb prepare {MODEL}" in err[0]
    assert main(["validate", "smollm2_135m_generate"]) == 0  # torchtune's generate config


def test_missing_model_points_at_a_copy_prepared_under_another_root(tmp_path, empty_cache):
    other = tmp_path / "home_cache"
    (other / MODEL).mkdir(parents=True)
    (other / MODEL / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        prepare.check_prepared(empty_cache / MODEL)
    assert f"export {model_cache.CACHE_ENV}={other}" in str(err.value) and "\n" not in str(err.value)
    prepare.check_prepared(other / MODEL)  # present: no error
    prepare.check_prepared(tmp_path / "elsewhere")  # not a cache model: left to the existence check


def test_path_prints_the_packaged_config(capsys):
    assert main(["path", "smollm2_135m_generate"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.endswith("smollm2_135m_generate.yaml") and yaml.safe_load(open(printed))["model"]
    assert main(["path", "nope"]) == 2


def _lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_validate_checks_a_resume_and_the_output_dir_as_the_run_would_without_writing(tmp_path, empty_cache, capsys):
    """Before resubmitting a job: the same run, an intact checkpoint, nobody else in output_dir."""
    import fcntl

    import torch
    from omegaconf import OmegaConf

    from torchtune_xgb.run import checkpointing
    from torchtune_xgb.models.cache import register_resolvers
    from torchtune_xgb.run.identity import run_identity
    from torchtune_xgb.run.run_record import record_output

    path, out = _tiny_yaml(tmp_path), tmp_path / "out"
    register_resolvers()
    identity = run_identity(OmegaConf.load(path), world_size=2)  # written by a 2-process run
    out.mkdir()
    record_output(str(out), checkpointing.RESUME_DIR, "resume")  # as the run records it, before writing
    checkpointing.save_resume_state(str(out), 6, {"x": torch.tensor([1.0])}, run=identity)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))

    assert main(["validate", str(path), "resume_from_checkpoint=True"]) == 0
    assert capsys.readouterr().out.strip().endswith("; the resume continues " + str(out / "xgb_resume" / "step_00000006"))
    assert main(["validate", str(path), "resume_from_checkpoint=True", "model.lora_alpha=32"]) == 2
    (line,) = _lines(capsys)
    assert line.startswith("error: resume_from_checkpoint: the config differs from the run that wrote ")
    assert "model.lora_alpha (checkpoint 2.0, now 32)" in line
    assert main(["validate", str(path)]) == 2  # a fresh run over the killed one's state
    assert _lines(capsys) == [f"error: output_dir: {out} holds another run (xgb_resume/); resume it with "
                              "resume_from_checkpoint=True, choose another output_dir, or pass overwrite_output_dir=True "
                              "to replace it"]
    assert main(["validate", str(path), "resume_from_checkpoint=True", "overwrite_output_dir=True"]) == 2
    assert _lines(capsys) == ["error: overwrite_output_dir: cannot be True together with resume_from_checkpoint=True"]

    with open(out / ".xgb_run.lock", "a+") as held:  # a run in progress there
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7")
        held.flush()
        assert main(["validate", str(path), "resume_from_checkpoint=True"]) == 2
        assert _lines(capsys) == [f"error: output_dir: {out} is in use by another run (pid 4242 on node7); wait for it "
                                  "to end or choose another output_dir"]
    (out / ".xgb_run.lock").unlink()
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing written

    (out / "xgb_resume" / "step_00000006" / "manifest.json").write_text("{}")  # no intact checkpoint left
    assert main(["validate", str(path), "resume_from_checkpoint=True"]) == 1
    (line,) = _lines(capsys)
    assert line.startswith(f"error: resume_from_checkpoint: no intact checkpoint under {out / 'xgb_resume'}: ")
