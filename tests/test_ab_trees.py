"""experiments.ab_trees: one command run in several source trees, compared row by row."""

import textwrap

import pandas as pd
import pytest

from experiments import ab_trees

BENCH = """
import argparse
import pandas as pd
from fakebench.speed import MS

parser = argparse.ArgumentParser()
parser.add_argument("--bits", default="4,2")
parser.add_argument("--csv")
args = parser.parse_args()
rows = [dict(bits=int(b), path="fused", ms=MS * int(b)) for b in args.bits.split(",")]
pd.DataFrame(rows + [dict(bits=16, ms=MS * 10)]).to_csv(args.csv)  # (a part without a path)
"""


def tree(root, name, ms, main=BENCH):
    pkg = root / name / "fakebench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "speed.py").write_text(f"MS = {ms}\n")
    (pkg / "__main__.py").write_text(textwrap.dedent(main))
    return root / name


def test_each_tree_runs_its_own_code_and_rows_compare_as_ratios(tmp_path, capsys):
    base, new = tree(tmp_path, "base", 2.0), tree(tmp_path, "new", 1.5)
    out = tmp_path / "runs.csv"
    table = ab_trees.main(["--tree", f"base={base}", "--tree", f"new={new}", "--rounds", "2", "--key", "bits,path",
                           "--value", "ms", "--out", str(out), "--", "fakebench", "--bits", "4,2"])
    assert table.set_index("bits")["base"].to_dict() == {2: 4.0, 4: 8.0, 16: 20.0}
    assert table.set_index("bits")["new"].to_dict() == {2: 3.0, 4: 6.0, 16: 15.0}
    assert table["new/base"].tolist() == [0.75, 0.75, 0.75]
    runs = pd.read_csv(out)
    assert len(runs) == 12 and set(runs["tree_round"]) == {0, 1}
    # the order rotates: round 0 runs base first, round 1 new first
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== round")]
    assert [line.split()[4].rstrip(":") for line in printed] == ["base", "new", "new", "base"]


def test_bad_trees_and_commands_are_named(tmp_path):
    base = tree(tmp_path, "base", 2.0)
    with pytest.raises(SystemExit):  # argparse: not a directory
        ab_trees.main(["--tree", f"base={base}", "--tree", f"new={tmp_path / 'none'}", "--key", "bits",
                       "--value", "ms", "--", "fakebench"])
    broken = tree(tmp_path, "broken", 1.0, main="raise SystemExit(3)")
    with pytest.raises(SystemExit, match="tree broken, round 0: the command exited 3"):
        ab_trees.main(["--tree", f"base={base}", "--tree", f"broken={broken}", "--rounds", "1", "--key", "bits",
                       "--value", "ms", "--", "fakebench"])
    with pytest.raises(SystemExit, match="no column speed"):
        ab_trees.main(["--tree", f"base={base}", "--tree", f"again={tree(tmp_path, 'again', 1.0)}", "--rounds", "1",
                       "--key", "bits", "--value", "speed", "--", "fakebench"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="tree empty .* cannot import fakebench: ModuleNotFoundError"):
        ab_trees.main(["--tree", f"base={base}", "--tree", f"empty={empty}", "--key", "bits", "--value", "ms",
                       "--", "fakebench"])


def test_a_tree_that_would_import_the_package_from_elsewhere_is_refused(tmp_path, monkeypatch):
    # the package is found first on an inherited path (as if the tree lacked it, or a copy shadowed it)
    base, new = tree(tmp_path, "base", 2.0), tmp_path / "new"
    new.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(base))
    with pytest.raises(SystemExit, match=r"tree new .* imports fakebench from .*base.*, not from the tree"):
        ab_trees.main(["--tree", f"base={base}", "--tree", f"new={new}", "--key", "bits", "--value", "ms",
                       "--", "fakebench"])
