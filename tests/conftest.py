import copy

import pytest
import torch

from placement.models import load_model

FAMILIES = ["tiny-random", "tiny-random-qwen2_moe", "tiny-random-qwen3_moe", "tiny-random-olmoe"]


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Variant and score caches of the test session in a folder of its own, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QOS_CACHE_DIR", str(tmp_path_factory.mktemp("qos-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_models():
    """Pristine tiny models by name (CPU, fp32, fixed seed); copy before handing to an engine."""
    return {name: load_model(name, device="cpu") for name in FAMILIES}


@pytest.fixture
def fresh(tiny_models):
    def make(name="tiny-random"):
        loaded = tiny_models[name]
        return copy.deepcopy(loaded.model), loaded.tokenizer

    return make


def profile_tiny(path, grid: str):
    """A quick profile of tiny-random over `grid` at `path` (one short perplexity window, 3 tokens
    timed once): fronts for the serving tests."""
    from qos.cli import main

    assert main(["profile", "--model", "tiny-random", "--grid", grid, "--out", str(path), "--max-windows", "1",
                 "--seqlen", "32", "--new-tokens", "3", "--repeats", "1", "--quiet"]) == 0
    return path


@pytest.fixture(scope="session")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (2, 24), generator=g)  # [batch, seq]


def stop_processes(find) -> list[int]:
    """SIGTERM the processes `find()` lists, wait up to 10 s for them to go, then SIGKILL what is
    left and wait up to 5 s more; returns those still there."""
    import os
    import signal
    import time

    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in find():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while find() and time.monotonic() < deadline:
            time.sleep(0.2)
    return list(find())
