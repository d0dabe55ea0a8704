"""Evaluation and calibration text, read from a local folder (never downloaded at run time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALIBRATION_FILE = "ptb/ptb.train.txt"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else $QOS_DATA_DIR, else ../shared/data beside the repo."""
    chosen = path or os.environ.get("QOS_DATA_DIR") or REPO.parent / "shared" / "data"
    return Path(chosen)


def read_text(path: str | os.PathLike) -> str:
    """A plain text file, or the "text" fields of a JSON-lines file joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
    return path.read_text(encoding="utf-8")


def calibration_text(path: str | os.PathLike | None = None, data: str | os.PathLike | None = None) -> str:
    """Text for router statistics: `path`, else PTB train from the data folder."""
    if path is not None:
        return read_text(path)
    default = data_dir(data) / CALIBRATION_FILE
    if not default.is_file():
        raise ValueError(
            f"no calibration text: looked for {default}; pass --calib FILE or set QOS_DATA_DIR"
        )
    return read_text(default)


# --- evaluation sets (the GPTQ/HQQ protocol) ------------------------------------------------------
DATASETS = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "ptb": "ptb/ptb.test.txt",
    "c4": "c4/c4-validation.00000-of-00008.first1025docs.jsonl",
}


def dataset_path(name: str, data: str | os.PathLike | None = None) -> Path:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    folder = data_dir(data)
    path = folder / DATASETS[name]
    if not path.is_file():
        raise ValueError(
            f"dataset {name} not found: looked for {DATASETS[name]} in {folder} "
            "(pass --data DIR or set QOS_DATA_DIR)"
        )
    return path


def eval_text(name: str, data: str | os.PathLike | None = None) -> str | list[str]:
    """WikiText-2 and PTB test: rows joined with blank lines (one long text, tokenized once).
    C4 validation: the list of documents (windows are drawn from single documents)."""
    path = dataset_path(name, data)
    if name == "c4":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    text = path.read_text(encoding="utf-8")
    if name == "wikitext2":  # the hub's rows: each line with its newline, blank lines (" \n") empty
        return "\n\n".join("" if line == " \n" else line for line in text.splitlines(keepends=True))
    return "\n\n".join(line.strip() for line in text.splitlines())
