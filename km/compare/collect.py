"""Collecting: the run directories TARGETs name (run dirs, sweep dirs, parents, globs) and one `RunRow` per
run, read from its files (`collect`) or from the W&B API (`collect_wandb`). Standard library only at module
level (yaml and wandb are imported where used)."""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any

from km.compare.row import CURVE_METRIC, DEFAULT_UNIT, UNIT_BY_DATA, RunRow, _error, _get
from km.runs import epoch_values, read_json, read_metrics, steps_by_epoch

SKIP_DIRS = {"wandb", "checkpoints", "samples", "__pycache__"}


# ---- discovery ------------------------------------------------------------------------------


def _expand(target: str | Path) -> list[Path]:
    t = str(target)
    if any(c in t for c in "*?["):
        matches = sorted(glob.glob(t))
        if not matches:
            raise _error(f"no runs found: nothing matches {t}")
        return [Path(m) for m in matches]
    p = Path(t)
    if not p.exists():
        raise _error(f"no such run, sweep or directory: {t}")
    return [p]


def _walk_runs(root: Path) -> list[Path]:
    found: list[Path] = []
    for d, dirs, files in os.walk(root):
        if "config.yaml" in files:
            found.append(Path(d))
            dirs[:] = []  # a run directory holds no further runs
            continue
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
    return found


def _sweep_runs(sweep: Path) -> list[Path]:
    """run_dir values of state.json's runs (a list or a dict of dicts); relative paths are tried
    against the working directory, the sweep directory and its parents."""
    state = read_json(sweep / "state.json") or {}
    runs = state.get("runs")
    if isinstance(runs, dict):
        runs = list(runs.values())
    out: list[Path] = []
    for r in runs if isinstance(runs, list) else []:
        rd = r.get("run_dir") if isinstance(r, dict) else None
        if not rd:
            continue
        for base in (Path("."), sweep, *sweep.resolve().parents):
            p = base / rd
            if (p / "config.yaml").is_file():
                out.append(p)
                break
    return out


def is_sweep_dir(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").is_file() and not (p / "config.yaml").is_file()


def discover(targets: list[str | Path]) -> list[Path]:
    """Run directories named by TARGETs (run dirs, sweep dirs, parents, globs), deduplicated, in order."""
    seen: set[Path] = set()
    out: list[Path] = []
    for t in targets:
        for p in _expand(t):
            if not p.is_dir():
                continue
            if (p / "config.yaml").is_file():
                found = [p]
            elif is_sweep_dir(p):
                found = _sweep_runs(p) or _walk_runs(p)
            else:
                found = _walk_runs(p)
            for f in found:
                key = f.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(f)
    return out


# ---- reading runs -----------------------------------------------------------------------------


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _count(v: Any) -> int | None:
    f = _finite(v)
    return int(f) if f is not None else None


def read_curves(rows: list[dict[str, str]], prefix: str = "val/") -> dict[str, list[list[float]]]:
    """{metric: [[epoch, value], ...]} for every `prefix` column of a run's metrics.csv rows (`read_metrics`;
    rows are sparse: a value counts only where present; a repeated epoch keeps its last value)."""
    keys = sorted({k for r in rows for k in r if k and k.startswith(prefix)})
    curves = {k: epoch_values(rows, k) for k in keys}
    return {k: [[e, d[e]] for e in sorted(d)] for k, d in curves.items() if d}


def _budget(rows: list[dict[str, str]], ev: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(steps trained, step of the evaluated checkpoint): metrics.csv is the record of training; eval.json's
    `steps` / `checkpoint_step` (or its checkpoint `epoch`) where metrics.csv says nothing."""
    ev = ev or {}
    by_epoch = steps_by_epoch(rows)
    trained = max(by_epoch.values()) if by_epoch else _finite(ev.get("steps"))
    ckpt = _finite(ev.get("checkpoint_step"))
    epoch = _count(ev.get("epoch"))
    if ckpt is None and epoch is not None and epoch in by_epoch:
        ckpt = by_epoch[epoch]
    return (None if trained is None else float(trained)), ckpt


def read_run(run_dir: Path) -> RunRow:
    """One row: identity from config.yaml (+ run.json), test numbers from eval.json, val curves
    from metrics.csv."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    meta = read_json(run_dir / "run.json") or {}
    ev = read_json(run_dir / "eval.json")
    metrics = {}
    if ev and isinstance(ev.get("metrics"), dict):
        metrics = {k: f for k, v in ev["metrics"].items() if (f := _finite(v)) is not None}
    rows = read_metrics(run_dir)  # one read of metrics.csv: budget and curves
    steps, checkpoint_step = _budget(rows, ev)
    return RunRow(
        run_dir=str(run_dir),
        name=cfg.get("name", meta.get("name")),
        run_id=cfg.get("run_id", meta.get("run_id")),
        model=_get(cfg, "model.name") or meta.get("model") or (ev or {}).get("model") or "?",
        data=_get(cfg, "data.name") or meta.get("data") or (ev or {}).get("data") or "?",
        seed=cfg.get("seed", meta.get("seed")),
        status=meta.get("status") or ("unreadable" if not cfg else "unknown"),
        error=meta.get("error"),
        episode_length=_get(cfg, "data.episode_length", (ev or {}).get("episode_length")),
        split=(ev or {}).get("split"),
        unit=(ev or {}).get("unit"),
        is_samples=(ev or {}).get("is_samples", _get(cfg, "eval.is_samples")),
        episodes=(ev or {}).get("episodes"),
        heldout_targets=_count((ev or {}).get("heldout_targets")),
        class_episodes=(ev or {}).get("class_episodes"),
        experiment=(meta.get("choices") or {}).get("experiment"),
        steps=steps,
        checkpoint_step=checkpoint_step,
        train_seconds=_finite((ev or {}).get("train_seconds")),
        metrics=metrics,
        curves=read_curves(rows),
        config=cfg,
    )


def collect(targets: list[str | Path]) -> list[RunRow]:
    """Rows (one per run) for every run under TARGETs; raises RunError when there are none."""
    dirs = discover(list(targets))
    if not dirs:
        raise _error(f"no runs found in {' '.join(map(str, targets))} (a run directory holds config.yaml)")
    return [read_run(d) for d in dirs]


# ---- W&B --------------------------------------------------------------------------------------


def _need_wandb_credentials(project: str) -> None:
    """A one-line error unless WANDB_API_KEY is set or ~/.netrc (or $NETRC) has the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        has_key = netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        has_key = False
    if not has_key:
        raise _error(f"--wandb {project}: no W&B credentials (set WANDB_API_KEY or run `wandb login`)")


def _wandb_curve(run: Any, curve_metric: str) -> list[list[float]]:
    """[[epoch, value], ...] of `curve_metric` from a W&B run's history; [] where it cannot be read."""
    curve: list[list[float]] = []
    try:
        per = {}
        for h in run.scan_history(keys=["epoch", curve_metric]):
            e, v = _finite(h.get("epoch")), _finite(h.get(curve_metric))
            if e is not None and v is not None:
                per[int(e)] = v
        curve = [[e, per[e]] for e in sorted(per)]
    except Exception:  # noqa: BLE001 - curves are optional
        pass
    return curve


def _wandb_row(project: str, r: Any, curve_metric: str) -> RunRow:
    cfg = dict(r.config)
    summary = {k: r.summary[k] for k in r.summary.keys()}  # the public mapping interface
    data = _get(cfg, "data.name") or "?"
    curve = _wandb_curve(r, curve_metric)
    return RunRow(
        run_dir=f"wandb:{project}/{r.id}",
        name=_get(cfg, "name", r.name),
        run_id=r.id,
        model=_get(cfg, "model.name") or "?",
        data=data,
        seed=_get(cfg, "seed"),
        status={"crashed": "failed"}.get(r.state, r.state),
        error=None,
        episode_length=_get(cfg, "data.episode_length"),
        split=None,
        unit=summary.get("unit") or UNIT_BY_DATA.get(data, DEFAULT_UNIT),
        is_samples=_get(cfg, "eval.is_samples"),
        episodes=None,
        heldout_targets=None,
        class_episodes=None,
        steps=None,
        train_seconds=None,
        metrics={
            k: f for k, v in summary.items() if "/" in k and not isinstance(v, bool) and (f := _finite(v)) is not None
        },
        curves={curve_metric: curve} if curve else {},
        config=cfg,
    )


def collect_wandb(project: str, curve_metric: str = CURVE_METRIC) -> list[RunRow]:
    """Rows from the W&B API, same shape as collect(). Needs network + credentials (untested here)."""
    _need_wandb_credentials(project)
    try:
        import wandb
    except ImportError as e:
        raise _error("--wandb needs the wandb package (pip install wandb)") from e
    try:
        runs = list(wandb.Api(timeout=30).runs(project))
    except Exception as e:  # noqa: BLE001 - any API/network failure becomes one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise _error(f"cannot read W&B project '{project}': {type(e).__name__}: {first}") from e
    if not runs:
        raise _error(f"no runs found in W&B project '{project}'")
    return [_wandb_row(project, r, curve_metric) for r in runs]
