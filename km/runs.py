"""Run directories: where a run lives, how to find its checkpoints, atomic file writes.

runs/<name>/<run_id>/
    config.yaml        resolved config (what `resume` reloads)
    run.json           run metadata (W&B id, status, created/updated, last error)
    checkpoints/       last.ckpt + best-*.ckpt
    samples/           PNG grids, one per validation epoch
    metrics.csv        every logged metric (km.callbacks.MetricsCSV, always on)
    eval.json          test results of every protocol (`km train`, `km eval`); eval_val.json: `km eval --split val`
    wandb/             W&B files (offline runs: `wandb sync runs/<name>/<run_id>/wandb/offline-run-*`)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


class RunError(RuntimeError):
    """A problem with a run directory or checkpoint: one-line message for the user."""


class NonFiniteLossError(RuntimeError):
    """A diverged run: a NaN / infinite loss, or a memory that no jitter makes positive definite (exit code 3).
    Raised by the training step (`km.models.base`); defined here, torch-free, for the CLI to catch."""


class RunInterrupted(RuntimeError):
    """A trainer stopped by SIGTERM (what schedulers and OOM reapers send) or SIGINT: the run keeps its last
    checkpoint and is marked `interrupted` (resumable). The CLI exits 128 + the signal's number, in one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def interrupt_signal(e: BaseException) -> tuple[str, int] | None:
    """(name, exit code) of the signal behind an exception out of Lightning, or None. Lightning turns SIGTERM
    into `SIGTERMException` (a SystemExit with code 0) and SIGINT into `sys.exit(1)` raised while handling the
    KeyboardInterrupt: both would end the process as if nothing happened."""
    if type(e).__name__ == "SIGTERMException":
        return "SIGTERM", 143
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return "SIGINT", 130
    return None


TMP_GLOB = ".*.tmp-*"  # the temp files of atomic_write: .<name>.tmp-<pid>


def atomic_write(path: Path, write: Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """The one atomic file writer: `write(f)` into `.<name>.tmp-<pid>` beside `path`, then `os.replace`, so a
    reader (or a crash) sees the old file or the new one, never half of one. On any failure (a full disk, a
    read-only folder, a kill signal turned exception) the temp file is removed before the error propagates,
    so a full disk is not kept full by our own partial files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def free_bytes(folder: Path) -> int:
    """Bytes available to us on the disk holding `folder` (-1 if unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def sweep_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temp files an earlier, killed process left in `run_dir` (and its checkpoints/): called by a
    trainer holding the run's lock, so none of them is being written."""
    gone = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for p in folder.glob(TMP_GLOB) if folder.is_dir() else []:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents: tensors and plain data only (`torch.load(weights_only=True)`), so a file whose
    unpickling would run code is refused before anything in it runs. Every reader of checkpoints uses this."""
    import pickle

    import torch

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise RunError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise RunError(f"{path} is not a checkpoint (a torch checkpoint is a zip file; this one starts {head!r})")
    try:
        with warnings.catch_warnings(record=True) as said:  # torch's notes on a refused file would add lines
            warnings.simplefilter("always")
            state = torch.load(path, map_location=map_location, weights_only=True)
        for w in said:  # a file that loads: its warnings are shown as usual
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise RunError(
            f"refusing checkpoint {path}: it holds objects other than tensors and plain data, which "
            f"could run code when loaded ({first})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        others = sorted(q.name for q in Path(path).parent.glob("*.ckpt") if q.name != Path(path).name)
        hint = f"; the run's other checkpoints: {', '.join(others)} (resume=<that file>)" if others else ""
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise RunError(
            f"cannot read checkpoint {path}: it is damaged or truncated ({type(e).__name__}: {first}){hint}"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise RunError(f"{path} is not a kanerva-lab checkpoint (no state_dict)")
    return state


class RunLock:
    """The exclusive lock a trainer holds on its run directory for its whole life: `fcntl.flock` on
    `<run_dir>/.lock`. The OS drops it when the process ends, however it ends (SIGKILL included), so a dead
    trainer never leaves a run locked; a live one (e.g. the orphan of a killed sweep agent) keeps it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._f: Any = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise RunError(
                f"{self.path.parent} is being trained by another process (pid {holder}); wait for it to "
                "end or stop it, then resume"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file releases the flock
            self._f = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path) -> str | None:
    """The pid (as written) of the process holding `run_dir`'s lock, or None when no process holds it."""
    if not (Path(run_dir) / ".lock").exists():
        return None
    try:
        with RunLock(run_dir):
            return None
    except RunError:
        return (Path(run_dir) / ".lock").read_text().strip() or "?"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when it is missing, unreadable or not an object (the one JSON reader of
    run files: run.json, eval.json, state.json readers build on it)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_meta(run_dir: Path) -> dict[str, Any]:
    """run.json ({} when missing, or damaged from outside: we write it atomically, so its record starts anew)."""
    return read_json(Path(run_dir) / "run.json") or {}


def write_meta(run_dir: Path, **updates: Any) -> dict[str, Any]:
    meta = read_meta(run_dir) | updates | {"updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=2))
    return meta


def mark_failed(run_dir: Path, error: str, status: str = "failed") -> None:
    """Record a failed run in run.json, even on a full disk: the atomic write needs a new file, so when it fails
    the status is written in place (run.json's own blocks are usually enough). Never raises."""
    last = last_checkpoint(run_dir)
    updates = {"status": status, "error": error, "last_good_checkpoint": str(last) if last else None}
    try:
        write_meta(run_dir, **updates)
    except OSError:
        try:
            text = json.dumps(read_meta(run_dir) | updates)
            with open(run_dir / "run.json", "r+") as f:
                f.write(text)
                f.truncate()
        except (OSError, ValueError):
            pass


def last_checkpoint(run_dir: Path) -> Path | None:
    p = run_dir / "checkpoints" / "last.ckpt"
    return p if p.exists() else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint by the run's monitored quantity, as its checkpoint callback recorded it (in the
    state saved with last.ckpt), so with checkpoint.save_top_k > 1 it is the best score, not the newest file.
    Falls back to the newest best-*.ckpt, then last.ckpt."""
    last = last_checkpoint(run_dir)
    if last is not None:
        try:
            callbacks = load_checkpoint(last).get("callbacks") or {}
        except RunError:
            callbacks = {}
        for key, cb in callbacks.items():  # the monitored ModelCheckpoint (the last.ckpt one monitors nothing)
            if key.startswith("ModelCheckpoint") and "'monitor': None" not in key and cb.get("best_model_path"):
                best = run_dir / "checkpoints" / Path(cb["best_model_path"]).name  # the run may have been moved
                if best.exists():
                    return best
    best_files = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    return best_files[-1] if best_files else last


def locate(target: str | Path) -> tuple[Path, Path]:
    """A run dir or a checkpoint file -> (run_dir, checkpoint). Prefers the best checkpoint."""
    p = Path(target)
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return run_dir, p
    if p.is_dir():
        ckpt = best_checkpoint(p)
        if ckpt is None:
            raise RunError(f"no checkpoint in {p}/checkpoints/ (has the run finished an epoch?)")
        return p, ckpt
    raise RunError(f"no such run directory or checkpoint: {p}")


def resolve_resume(resume: str, runs_dir: Path, name: str, run_id: str | None) -> tuple[Path, Path] | None:
    """`resume=<run dir | checkpoint | auto>` -> (run_dir, checkpoint to continue from).

    auto: the run `run_id` if given, else the newest run of experiment `name`, if it has a
    last checkpoint; None (start fresh) otherwise.
    """
    if resume == "auto":
        if run_id:
            cands = [runs_dir / name / run_id]
        else:
            cands = sorted((runs_dir / name).glob("*/checkpoints/last.ckpt"), key=lambda q: q.stat().st_mtime)
            cands = [c.parent.parent for c in cands[-1:]]
        for d in cands:
            if last_checkpoint(d):
                return d, last_checkpoint(d)
        return None
    p = Path(resume)
    if p.is_file():
        if p.parent.name != "checkpoints" or not (p.parent.parent / "config.yaml").is_file():
            raise RunError(
                f"cannot resume from {p}: not a checkpoint of a run (<run>/checkpoints/*.ckpt beside the run's "
                "config.yaml); give the run directory or one of its checkpoints"
            )
        return p.parent.parent, p
    if p.is_dir():
        ckpt = last_checkpoint(p)
        if ckpt is None:
            raise RunError(f"cannot resume {p}: no checkpoints/last.ckpt (the run never finished an epoch)")
        return p, ckpt
    raise RunError(f"cannot resume: no such run directory or checkpoint: {p}")


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop metrics.csv rows logged after the checkpoint we resume from (epoch > last_epoch), and the test rows
    of an earlier finished attempt (the continued run is evaluated again when it ends)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    keep = [
        r
        for r in rows
        if (not r.get("epoch") or int(float(r["epoch"])) <= last_epoch)
        and not any(k.startswith("test") and v not in (None, "") for k, v in r.items() if k)
    ]
    if keep == rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=header)
    w.writeheader()
    w.writerows(keep)
    atomic_write_text(path, buf.getvalue())


def append_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a run's metrics.csv (the one writer of it). The header is the sorted union of every key
    seen; a row with a new key rewrites the file under the wider header (atomically), as Lightning's CSV writer
    does, and otherwise rows are appended. An existing file (a resumed run) is continued, never replaced."""
    if not rows:
        return
    path = Path(run_dir) / "metrics.csv"
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except FileNotFoundError:
        header = []
    keys = sorted(set(header).union(*rows))
    if header and keys != header:  # a new metric: every earlier row is kept under the wider header
        old = read_metrics(run_dir)
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(old + rows)
        atomic_write_text(path, buf.getvalue())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        if not header:
            w.writeheader()
        w.writerows(rows)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv (MetricsCSV: sparse rows, one column per metric); [] when it is missing
    or unreadable (e.g. being rewritten while a sweep agent polls it). The one reader of metrics.csv."""
    path = Path(run_dir) / "metrics.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):  # damaged from outside: no curves rather than a traceback
        return []


def check_metrics_file(run_dir: Path) -> None:
    """Refuse (RunError, one line) a metrics.csv that a resume could not continue: not UTF-8, not CSV, or an
    epoch column that is not a number. Called before anything of the run is touched."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("epoch"):
                    float(r["epoch"])
    except UnicodeDecodeError as e:
        raise RunError(f"cannot resume: {path} is not UTF-8 text (byte {e.start}); restore or remove it") from None
    except (csv.Error, ValueError) as e:
        raise RunError(f"cannot resume: {path} is damaged ({str(e)[:80]}); restore or remove it") from None
    except OSError as e:
        raise RunError(f"cannot resume: {path} cannot be read ({e.strerror})") from None


def _number(v: str | None) -> float | None:
    try:
        f = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) else None


def epoch_values(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """{epoch: value} of one epoch-level metric in metrics.csv rows (the last value logged in each epoch)."""
    out = {}
    for r in rows:
        ep, v = _number(r.get("epoch")), _number(r.get(key))
        if ep is not None and v is not None:
            out[int(ep)] = v
    return out


def epoch_metrics(run_dir: Path, key: str) -> dict[int, float]:
    """{epoch: value} of one epoch-level metric of a run (`epoch_values` of its metrics.csv)."""
    return epoch_values(read_metrics(run_dir), key)


def steps_by_epoch(rows: list[dict[str, str]]) -> dict[int, int]:
    """{epoch: optimiser steps done at its end} from metrics.csv rows (Lightning logs an epoch's metrics at
    global step - 1, so the step count is the epoch's largest logged `step` + 1)."""
    last: dict[int, int] = {}
    for r in rows:
        ep, st = _number(r.get("epoch")), _number(r.get("step"))
        if ep is not None and st is not None:
            last[int(ep)] = max(last.get(int(ep), -1), int(st) + 1)
    return last
