import copy
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def cross_compile(tmp_path):
    """Run a script that compiles kernels for sm_90 (kernels defined with triton.jit, in a fresh
    process with its own Triton cache) and return its stdout, after checking that it exits cleanly
    and prints "compiled". Skips where triton has no NVIDIA backend with ptxas."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton has no NVIDIA backend with ptxas here")

    def run(script: str) -> str:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root), "TRITON_CACHE_DIR": str(tmp_path)}
        env.pop("TRITON_INTERPRET", None)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
        return done.stdout

    return run
