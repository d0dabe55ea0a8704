"""Evaluation and calibration text: from a local folder, else (online, with `datasets`) the hub."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)
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


# Where the same rows live on the Hugging Face hub (the GPTQ loaders), used when the local file is
# missing and the machine is online with the `datasets` package: (load_dataset args, kwargs, column).
HUB = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), {"split": "test"}, "sentence"),
    "c4": (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                             "split": "validation"}, "text"),
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def dataset_path(name: str, data: str | os.PathLike | None = None) -> Path:
    """The local file of `name`; a clear error naming the folder and the file when it is missing."""
    _check_name(name)
    folder = data_dir(data)
    path = folder / DATASETS[name]
    if not path.is_file():
        raise ValueError(
            f"dataset {name} not found: looked for {DATASETS[name]} in {folder} "
            "(pass --data DIR or set QOS_DATA_DIR; online, `pip install datasets` reads it from the hub)"
        )
    return path


def _local_rows(name: str, path: Path) -> list[str]:
    """The rows the hub's dataset has, read from the local copy of the same file."""
    if name == "c4":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if name == "wikitext2":  # hub rows keep their newline; blank lines (" \n") are empty rows
        return ["" if line == " \n" else line for line in lines]
    return [line.strip() for line in lines]  # PTB: one sentence per row


def _hub_rows(name: str) -> list[str] | None:
    """The rows from the hub, or None when offline, without `datasets`, or on any failure."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    try:
        import datasets
    except ImportError:
        return None
    args, kwargs, column = HUB[name]
    try:
        return list(datasets.load_dataset(*args, **kwargs)[column])
    except Exception as err:  # no network, moved repository, ...: fall back to the clear local error
        log.warning("could not read %s from the hub: %s", name, err)
        return None


def eval_text(name: str, data: str | os.PathLike | None = None) -> str | list[str]:
    """WikiText-2 and PTB test: rows joined with blank lines (one long text, tokenized once).
    C4 validation: the list of documents (windows are drawn from single documents)."""
    _check_name(name)
    local = data_dir(data) / DATASETS[name]
    rows = _local_rows(name, local) if local.is_file() else _hub_rows(name)
    if rows is None:
        dataset_path(name, data)  # raises the error that names the folder and the file
    return rows if name == "c4" else "\n\n".join(rows)
