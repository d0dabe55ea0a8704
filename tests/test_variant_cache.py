"""The on-disk variant cache's housekeeping: loads mark a file used, `prune` keeps the most recently
used files within a size and removes writers' leftovers, and `qos cache` reports and prunes."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from placement.packed import expert_layout
from placement.plan import ExpertId
from placement.variants import TEMP_GRACE_S, VariantCache, cache_files, prune
from qos.cli import main

LAYOUT = expert_layout(64, 128, 4, torch.float32, 64)


def fill(root, n: int) -> tuple[VariantCache, list]:
    cache = VariantCache("f" * 16, "hqq", torch.float32, root=root)
    gen = torch.Generator().manual_seed(0)
    for e in range(n):
        cache.save(ExpertId(0, e), 4, 64, LAYOUT, torch.randint(0, 256, (LAYOUT.nbytes,), dtype=torch.uint8,
                                                                  generator=gen))
    paths = [cache.path(ExpertId(0, e), 4, 64) for e in range(n)]
    for age, path in enumerate(reversed(paths)):  # expert 0 oldest
        os.utime(path, (time.time() - 100 * (age + 1),) * 2)
    return cache, paths


def test_prune_keeps_the_most_recently_used_within_the_size(tmp_path):
    cache, paths = fill(tmp_path, 4)
    size = paths[0].stat().st_size
    assert [f["path"] for f in cache_files(tmp_path)] == [str(p) for p in reversed(paths)]
    assert cache.load(ExpertId(0, 0), 4, 64, LAYOUT) is not None  # a load marks expert 0 used now
    assert prune(2 * size, tmp_path, dry_run=True)["removed_files"] == 2 and all(p.exists() for p in paths)
    done = prune(2 * size + size // 2, tmp_path)
    assert done == {"kept_files": 2, "kept_bytes": 2 * size, "removed_files": 2, "removed_bytes": 2 * size,
                    "dry_run": False}
    assert [p.exists() for p in paths] == [True, False, False, True]  # the newest (3) and the one just read (0)
    assert prune(0, tmp_path)["kept_files"] == 0 and not cache_files(tmp_path)
    with pytest.raises(ValueError, match=">= 0 bytes"):
        prune(-1, tmp_path)


def test_prune_removes_temporary_files_of_writers_that_died(tmp_path):
    cache, paths = fill(tmp_path, 1)
    old, fresh = cache.dir / ".L000-E009-b4-g64.abc.tmp", cache.dir / ".L000-E008-b4-g64.def.tmp"
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - TEMP_GRACE_S - 10,) * 2)
    assert prune(1 << 30, tmp_path)["removed_files"] == 1
    assert not old.exists() and fresh.exists() and paths[0].exists()  # a live writer's file stays


def test_qos_cache_reports_and_prunes(tmp_path, capsys):
    fill(tmp_path, 3)
    assert main(["cache", "--dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == 3 and out["folders"][0]["model"] == "f" * 16 and out["folders"][0]["files"] == 3
    assert main(["cache", "--dir", str(tmp_path), "--prune-to", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prune"]["removed_files"] == 3 and out["files"] == 0
    assert main(["cache", "--prune-to", "lots"]) == 2
    assert "not a byte count" in capsys.readouterr().err
