"""Result files: CSV rows keyed by dataset (and its content), seed, method and run identity, and
their args sidecar.

Every row carries a ``run_id``: a short digest of the pretrained model's contents ("none"
without one) and of every setting that changes the numbers. A file may hold rows of several
identities; re-running skips a row only when dataset, its ``data_id``, seed, method and identity
all match,
and summaries and figures use one identity at a time (the newest unless one is chosen). The
sidecar ``FILE.args.json`` keeps each identity's settings and arguments. Importing does nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from errors import DataError
from files import atomic_write, locked

log = logging.getLogger("scpretrain.results")

RUN_ID = "run_id"
DATA_ID = "data_id"  # what the row's dataset was (data.dataset_digest): a changed file is done again
NO_MODEL = "none"


def short_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:12]


def run_identity(model: str, settings: dict) -> str:
    """The identity of a run: the model digest and the result-changing settings, digested."""
    text = json.dumps({"model": model, "settings": settings}, sort_keys=True, default=str)
    return short_digest(text.encode())


# --------------------------------------------------------------------------- reading and writing


def read_results(path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Rows of a result CSV (empty when the file does not exist); a file that is not one of ours
    (unreadable, or lacking the ``required`` columns) is an error and is left untouched."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a CSV file path")
    try:
        frame = pd.read_csv(path, dtype={RUN_ID: str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: is empty, not a result file of this tool; move it away or pass "
                             "another path") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}); move it away or pass another path") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: lacks the columns {missing} of this tool's results (found "
                             f"{list(frame.columns)[:8]}); it was not written by this version, so it is left "
                             "untouched: move it away or pass another path")
    return frame


def append_results(path, rows: list[dict], required: Sequence[str] = ()) -> pd.DataFrame:
    """Existing rows plus ``rows``, rewritten atomically, under the file's lock: two runs appending
    to one file take turns and lose none of each other's rows."""
    with locked(path):
        frame = pd.concat([read_results(path, required), pd.DataFrame(rows)], ignore_index=True)
        atomic_write(path, lambda fh: frame.to_csv(fh, index=False))
    return frame


def done_keys(frame: pd.DataFrame, key: Sequence[str]) -> set:
    """The keys (values of the ``key`` columns, as str) of the rows already written; rows that lack
    a key column (written before it existed) match no key, so they are done again."""
    if frame.empty:
        return set()
    found = frame.reindex(columns=list(key))
    return set(map(tuple, found.astype(str).values))


def start_run(out, settings: dict, digest: str, config: dict, columns: Sequence[str],
              key: Sequence[str]) -> tuple[str, set]:
    """A script's run identity (``digest`` of its model and its result-changing ``settings``) and
    the keys of the rows it has already written to ``out`` (which must be one of our result files);
    the identity's settings and the run's ``config`` go to the sidecar."""
    run_id = run_identity(digest, settings)
    finished = done_keys(read_results(out, columns), key)
    record_identity(out, run_id, digest, settings, config)
    return run_id, finished


def sidecar_path(csv_path) -> Path:
    return Path(str(csv_path) + ".args.json")


def record_identity(csv_path, run_id: str, model: str, settings: dict, config: dict) -> Path:
    """Add (or refresh) this identity's settings in the sidecar ``CSV.args.json``; other
    identities' entries are kept."""
    path = sidecar_path(csv_path)
    with locked(path):
        known = {}
        if path.exists():
            try:
                known = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("%s: unreadable; starting it anew", path)
            if not isinstance(known, dict) or "identities" not in known:
                known = {"identities": {}}
        known.setdefault("identities", {})[run_id] = {"model_digest": model, "settings": settings, "args": config}
        atomic_write(path, lambda fh: json.dump(known, fh, indent=2, sort_keys=True, default=str))
    return path


def choose_identity(frame: pd.DataFrame, wanted: str | None, path) -> tuple[pd.DataFrame, str | None]:
    """The rows of one identity: ``wanted``, or the newest (the last row's). Says how many other
    identities the file holds, so that nothing is averaged across models or settings."""
    if frame.empty or RUN_ID not in frame.columns:
        return frame, None
    ids = list(dict.fromkeys(frame[RUN_ID].astype(str)))
    chosen = wanted if wanted is not None else str(frame[RUN_ID].astype(str).iloc[-1])
    if chosen not in ids:
        raise DataError(f"{path}: holds no rows of run identity '{chosen}'; it holds {ids}")
    others = len(ids) - 1
    if others:
        log.info("%s: using run identity %s (%s); the file holds %d other identit%s (%s); pick one with --run_id",
                 path, chosen, "as asked" if wanted else "the newest", others, "y" if others == 1 else "ies",
                 ", ".join(i for i in ids if i != chosen))
    return frame[frame[RUN_ID].astype(str) == chosen], chosen


def read_checked(path, required: Sequence[str], numeric: Sequence[str], what: str,
                 text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """A result CSV for reading only (figures): the ``required`` columns are there, the ``numeric``
    ones hold numbers (NaN allowed), the ``text_columns`` are str."""
    path = Path(path)
    frame = read_results(path)
    if frame.empty and not path.exists():
        raise DataError(f"{path}: not found; expected {what}")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing required columns {missing} (found: {list(frame.columns)}); "
                             f"is it {what}?")
    for column in numeric:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            examples = list(pd.unique(frame.loc[bad, column].astype(str)))[:3]
            raise DataError(f"{path}: column '{column}' must hold numbers, found {examples} "
                                 f"in {int(bad.sum())} rows")
        infinite = np.isinf(values)
        if infinite.any():
            raise DataError(f"{path}: column '{column}' holds infinite values in {int(infinite.sum())} rows; "
                            "a metric is never infinite: the file is damaged")
        frame[column] = values.astype(float)
    for column in text_columns:
        frame[column] = frame[column].astype(str)
    return frame
