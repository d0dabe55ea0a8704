"""The README's commands work as written: every ```bash block and the Python API's ```python block
runs in a fresh copy of the repository (what a clone has, plus files not committed yet, so outputs
land in a new `runs/`), each command under a timeout, and must exit with status 0; every `runs/...`
file a block names must exist afterwards.

A block whose first line is `# needs: WHAT[, WHAT...]` is not run by default: `gpu`, `network` and
`minutes` blocks are skipped, `ray` blocks run under `-m ray` (on a cluster of their own: Ray's
files in a temporary folder, its processes stopped by id afterwards, not by `ray stop`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog.data import DATASETS, data_dir
from tests.conftest import stop_processes

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NEEDS = {"gpu", "ray", "network", "minutes"}
TIMEOUT_S = 180  # one command; the default blocks take about 40 s together on 2 cores
RUNS = re.compile(r"(?<![\w/.])runs/[\w./-]*[\w]")
HAVE_DATA = all((data_dir() / f).is_file() for f in DATASETS.values())


@dataclass(frozen=True)
class Block:
    lang: str  # bash or python
    section: str  # the heading above it
    line: int  # of the opening fence, 1-based
    code: str
    needs: frozenset[str]

    @property
    def id(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}-L{self.line}"


def parse_blocks(text: str) -> list[Block]:
    """The bash and python blocks of a markdown text, with the heading each sits under."""
    blocks, section, fence = [], "", None
    for i, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, start, lines = line[3:].strip(), i, []
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
        elif line.startswith("```"):
            if fence in ("bash", "python"):
                first = lines[0].strip() if lines else ""
                m = re.fullmatch(r"#\s*needs:\s*(.+)", first)
                needs = frozenset(n.strip() for n in m.group(1).split(",")) if m else frozenset()
                blocks.append(Block(fence, section, start, "\n".join(lines) + "\n", needs))
            fence = None
        else:
            lines.append(line)
    assert fence is None, "the README ends inside a code block"
    return blocks


def commands(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comment-only and blank lines dropped."""
    out, current = [], ""
    for line in code.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    assert not current, f"a command ends in a line continuation: {current!r}"
    return out


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))


def _param(block: Block):
    others = block.needs - {"ray"}
    if others:
        marks = [pytest.mark.skip(reason=f"needs: {', '.join(sorted(block.needs))}")]
    elif block.needs:
        marks = [pytest.mark.ray]
    else:
        marks = []
    return pytest.param(block, id=block.id, marks=marks)


# --- the parts --------------------------------------------------------------------------------------
def test_blocks_are_found_and_their_needs_are_known():
    assert sum(b.lang == "bash" for b in BLOCKS) >= 5 and [b for b in BLOCKS if b.lang == "python"]
    assert any(not b.needs for b in BLOCKS if b.lang == "bash"), "no README command runs on a CPU"
    for b in BLOCKS:
        assert b.needs <= NEEDS, f"README line {b.line}: unknown need(s) {sorted(b.needs - NEEDS)}; known: {sorted(NEEDS)}"
        if b.lang == "bash":
            assert commands(b.code), f"README line {b.line}: an empty block"


def test_a_block_is_parsed_into_commands_with_its_needs():
    text = "# T\n\n```bash\n# needs: gpu, ray\nqos a \\\n    --b 1   # note\n\n# c\nqos d\n```\n## U\n```yaml\nx: 1\n```\n"
    (block,) = parse_blocks(text)
    assert (block.section, block.line, block.needs) == ("T", 3, frozenset({"gpu", "ray"}))
    assert commands(block.code) == ["qos a      --b 1   # note", "qos d"]


def test_packages_export_their_names_and_catalog_stays_free_of_torch():
    code = ("import sys, catalog\n"
            "[getattr(catalog, n) for n in catalog.__all__]\n"
            "assert 'torch' not in sys.modules, 'catalog imports torch'\n"
            "import placement, profiler, runtime\n"
            "for p in (placement, profiler, runtime):\n"
            "    [getattr(p, n) for n in p.__all__]\n"
            "assert 'ray' not in sys.modules, 'an export imports ray'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]


# --- the blocks -------------------------------------------------------------------------------------
def _copy_repo(dest: Path) -> Path:
    """The repository as a clone would have it, plus files not committed yet (not ignored ones)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".cache", ".device-*", "build", "dist"))
        return dest
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # (a file deleted but not yet committed is listed too)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _run(args: list[str], cwd: Path, env: dict, what: str) -> None:
    """Run one command in its own process group (killed whole on a timeout); fail naming it."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} ran over {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{out[-4000:]}"


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a cluster just stopped leaves TIME_WAITs
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _stop_processes_with(env_entry: bytes) -> None:
    """Stop the processes whose environment holds `env_entry` (the Ray cluster a block started: its
    daemons and workers inherit the block's RAY_TMPDIR), by process id."""
    def ours() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if env_entry in (d / "environ").read_bytes().split(b"\0"):
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    assert not stop_processes(ours), "processes of the README's Ray cluster outlived SIGKILL"


@pytest.mark.skipif(not HAVE_DATA, reason="evaluation text not found (set QOS_DATA_DIR)")
@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path):
    work = _copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "QOS_DATA_DIR": str(data_dir().resolve()), "RAY_USAGE_STATS_ENABLED": "0",
           # one thread per command: tiny models gain nothing from more, and on a busy machine
           # spinning OpenMP threads multiply the time several-fold
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    where = f"README line {block.line} ({block.section})"
    ray_dir = None
    if "ray" in block.needs:
        if _port_taken(6379) or _port_taken(8265):
            pytest.skip("a Ray cluster already runs here (ports 6379/8265 taken)")
        ray_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        env["RAY_TMPDIR"] = ray_dir
    try:
        if block.lang == "python":
            _run([sys.executable, "-c", block.code], work, env, f"{where}: the python block")
        else:
            for cmd in commands(block.code):
                if ray_dir and re.match(r"ray stop\b", cmd):
                    continue  # would stop every Ray process of this user; the cluster is stopped below
                _run(["bash", "-c", f"set -o pipefail\n{cmd}"], work, env, f"{where}: `{cmd}`")
    finally:
        if ray_dir:
            _stop_processes_with(f"RAY_TMPDIR={ray_dir}".encode())
            shutil.rmtree(ray_dir, ignore_errors=True)
    for name in sorted(set(RUNS.findall(block.code))):
        path = work / name
        assert path.exists() and (path.is_dir() or path.stat().st_size > 0), f"{where}: {name} was not written"
