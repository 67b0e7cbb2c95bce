"""`km compare`: tables and plots across runs.

    km compare TARGET... [--out DIR] [--metric test/neg_elbo] [--curve-metric val/neg_elbo] [--by KEY]
                         [--doc PATH]
    km compare --wandb ENTITY/PROJECT [...]

TARGETs are run directories (a directory holding config.yaml), sweep directories (holding state.json:
the `run_dir` of each entry in its `runs` is used; without any, the directory is searched), parent
directories (searched for */config.yaml, skipping wandb/, checkpoints/, samples/) or globs ('runs/cmp/*').

Runs are grouped by (data set, model, episode length, named experiment config[, --by config keys]); the seeds of a group are
pooled. Test numbers come from each run's eval.json (written by `km train` / `km eval`); runs without
one (or whose eval.json is for another split) are counted and left out of the table but their
metrics.csv still feeds the learning curves. Failed runs (run.json status 'failed') are left out of
both. A run counts as evaluated when it has any metric of --metric's split family: for a test
metric that is any `test*/` metric (`test/` = iid episodes, `test_class/` = one-class episodes).

Every metric belongs to one protocol group, and no table column mixes two:

    joint               neg_elbo, nll_is{S}, recon, kl, kl_<part>: the bound of the whole episode per
                        image, every KL inside; bounds ln p(X)/T (nll_is{S}: importance-sampled NLL).
    memory_conditional  memory_conditional: the K++/GPM protocol (memory written from the whole
                        episode, each item scored by recon + its own KLs, KL(M) left out); NOT a bound.
    heldout             heldout, heldout_nll_is{S}, heldout_recon, heldout_kl[_<part>]: memory written
                        from the first T-n items, the n targets scored (eval.json heldout_targets = n);
                        bounds ln p(x_target | context) per target image.
    other               anything else.

Column order: joint | memory-conditional | held-out (iid) | held-out (class) | joint (class) |
memory-conditional (class) | other. Written into --out (default runs/compare/<timestamp>, or
<sweep dir>/compare for one sweep dir):

    table.md / table.csv   one row per group: mean ± std over seeds per test metric, n, unit, episode
                           length T, IS sample count, steps trained (from metrics.csv), the step of the
                           evaluated checkpoint (ckpt step) and train seconds (eval.json), means over
                           seeds where known; sorted by data set, then
                           the mean of --metric. table.md opens with one line per column group naming
                           its protocol and shows the main columns (joint: neg_elbo, nll_is*, recon, kl;
                           memory_conditional; heldout: heldout, heldout_nll_is*; the same for
                           test_class/; + --metric); table.csv has every metric, in group order.
                           The best group per data set (lowest --metric) is bold in table.md and has
                           best=1 in table.csv, but only when the groups compared share one training
                           budget (the same `steps` wherever known); otherwise none is marked and a
                           note says so.
    curves_<data>.png      --curve-metric vs epoch per data set, one line per group (mean over seeds,
                           shaded ± std where two or more seeds reach that epoch).
    metric_bars.png        --metric per group (test/neg_elbo by default: the joint bound; the axis names
                           the metric and its protocol), one subplot per data set (units differ), error bars = std
                           over seeds, n under each bar; the y axis is zoomed onto the bars.
    summary.json           the same numbers, machine readable (groups, column_groups, notes, per-run
                           rows, curves).

`--doc PATH` also writes the tables into a markdown document between the lines
`<!-- km compare: begin -->` and `<!-- km compare: end -->`: only that block is replaced (hand-written
text around it is kept); a file without the markers gets the block appended, a missing file is created.
The block holds the command that regenerates it, the date, the column-group legend, one table per
data set (units in the header) and the notes. The file is written atomically (temp file + os.replace).

Std is the sample std (ddof=1). With one run it is undefined: '-' in table.md, empty in table.csv,
null in summary.json, no error bar / band in the plots. Every metric is lower-is-better.

`--wandb ENTITY/PROJECT` builds the same rows from the W&B API (`wandb.Api().runs(project)`:
run.config for model/data/seed/episode length, run.summary for metrics, run.scan_history for the
curve). It needs network access and credentials (WANDB_API_KEY or `wandb login`); without them it
stops with a one-line error. It is not exercised by the tests (no W&B server here). Note that
`km eval` writes eval.json but does not log test/* to W&B, so a W&B table has test columns only for
runs that logged them; `--metric val/neg_elbo` tables the final validation numbers of the summary.

Module-level imports are stdlib only: the CLI imports this module on every command.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shlex
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from km.runs import atomic_write_text, epoch_values, read_json, read_metrics, steps_by_epoch

MAIN_METRIC = "test/neg_elbo"
CURVE_METRIC = "val/neg_elbo"
SKIP_DIRS = {"wandb", "checkpoints", "samples", "__pycache__"}
UNIT_BY_DATA = {"cifar10": "bits/dim"}  # fallback when no eval.json says; everything else is binary
DEFAULT_UNIT = "nats/image"


def _error(msg: str) -> Exception:
    from km.runs import RunError  # stdlib-only module; mapped by km.cli to 'error: ...' + exit 2

    return RunError(msg)


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


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """cfg['a']['b'] for 'a.b'; also accepts flat 'a.b' / 'a/b' keys (W&B configs)."""
    for flat in (dotted, dotted.replace(".", "/")):
        if flat in cfg:
            v = cfg[flat]
            return v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v
    cur: Any = cfg
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return default
    return cur


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


def read_run(run_dir: Path) -> dict[str, Any]:
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
    return {
        "run_dir": str(run_dir),
        "name": cfg.get("name", meta.get("name")),
        "run_id": cfg.get("run_id", meta.get("run_id")),
        "model": _get(cfg, "model.name") or meta.get("model") or (ev or {}).get("model") or "?",
        "data": _get(cfg, "data.name") or meta.get("data") or (ev or {}).get("data") or "?",
        "seed": cfg.get("seed", meta.get("seed")),
        "status": meta.get("status") or ("unreadable" if not cfg else "unknown"),
        "error": meta.get("error"),
        "episode_length": _get(cfg, "data.episode_length", (ev or {}).get("episode_length")),
        "split": (ev or {}).get("split"),
        "unit": (ev or {}).get("unit"),
        "is_samples": (ev or {}).get("is_samples", _get(cfg, "eval.is_samples")),
        "episodes": (ev or {}).get("episodes"),
        "heldout_targets": _count((ev or {}).get("heldout_targets")),
        "class_episodes": (ev or {}).get("class_episodes"),
        "experiment": (meta.get("choices") or {}).get("experiment"),
        "steps": steps,
        "checkpoint_step": checkpoint_step,
        "train_seconds": _finite((ev or {}).get("train_seconds")),
        "metrics": metrics,
        "curves": read_curves(rows),
        "config": cfg,
    }


def collect(targets: list[str | Path]) -> list[dict[str, Any]]:
    """Rows (one per run) for every run under TARGETs; raises RunError when there are none."""
    dirs = discover(list(targets))
    if not dirs:
        raise _error(f"no runs found in {' '.join(map(str, targets))} (a run directory holds config.yaml)")
    return [read_run(d) for d in dirs]


def collect_wandb(project: str, curve_metric: str = CURVE_METRIC) -> list[dict[str, Any]]:
    """Rows from the W&B API, same shape as collect(). Needs network + credentials (untested here)."""
    if not os.environ.get("WANDB_API_KEY"):
        try:
            import netrc

            host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
            has_key = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            raise _error(f"--wandb {project}: no W&B credentials (set WANDB_API_KEY or run `wandb login`)")
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
    rows = []
    for r in runs:
        cfg = dict(r.config)
        summary = {k: r.summary[k] for k in r.summary.keys()}  # the public mapping interface
        data = _get(cfg, "data.name") or "?"
        curve: list[list[float]] = []
        try:
            per = {}
            for h in r.scan_history(keys=["epoch", curve_metric]):
                e, v = _finite(h.get("epoch")), _finite(h.get(curve_metric))
                if e is not None and v is not None:
                    per[int(e)] = v
            curve = [[e, per[e]] for e in sorted(per)]
        except Exception:  # noqa: BLE001 - curves are optional
            pass
        rows.append(
            {
                "run_dir": f"wandb:{project}/{r.id}",
                "name": _get(cfg, "name", r.name),
                "run_id": r.id,
                "model": _get(cfg, "model.name") or "?",
                "data": data,
                "seed": _get(cfg, "seed"),
                "status": {"crashed": "failed"}.get(r.state, r.state),
                "error": None,
                "episode_length": _get(cfg, "data.episode_length"),
                "split": None,
                "unit": summary.get("unit") or UNIT_BY_DATA.get(data, DEFAULT_UNIT),
                "is_samples": _get(cfg, "eval.is_samples"),
                "episodes": None,
                "heldout_targets": None,
                "class_episodes": None,
                "steps": None,
                "train_seconds": None,
                "metrics": {
                    k: f
                    for k, v in summary.items()
                    if "/" in k and not isinstance(v, bool) and (f := _finite(v)) is not None
                },
                "curves": {curve_metric: curve} if curve else {},
                "config": cfg,
            }
        )
    return rows


# ---- protocols ----------------------------------------------------------------------------------

PROTOCOL_TITLES = {
    "joint": "joint bound -ELBO/T (every KL, bounds ln p(X)/T)",
    "memory_conditional": "memory-conditional (KL(M) left out; NOT a bound on ln p(X); the K++/GPM protocol)",
    "heldout": "held-out {n}targets (bounds ln p(x_target | context))",
    "other": "other metrics",
}
SHORT_NAMES = {"joint": "joint", "memory_conditional": "mem-cond", "heldout": "held-out", "other": "other"}
# column-group order: (one-class episodes?, protocol) -> rank
GROUP_RANK = {
    (False, "joint"): 0,
    (False, "memory_conditional"): 1,
    (False, "heldout"): 2,
    (True, "heldout"): 3,
    (True, "joint"): 4,
    (True, "memory_conditional"): 5,
    (False, "other"): 6,
    (True, "other"): 7,
}
CORE_PART_RANK = {"joint": 3, "memory_conditional": 0, "heldout": 1, "other": -1}  # table.md shows ranks <= this


def classify(name: str) -> tuple[str, str, str]:
    """(split, protocol, part) of a metric name, e.g. 'test_class/heldout_kl_z' -> ('test_class',
    'heldout', 'kl_z'); the bound itself is part 'neg_elbo' (joint, heldout) or 'score' (memory_conditional)."""
    split, _, leaf = name.partition("/")
    if leaf == "memory_conditional":
        return split, "memory_conditional", "score"
    if leaf == "heldout" or leaf.startswith("heldout_"):
        return split, "heldout", leaf[len("heldout_") :] or "neg_elbo"
    if leaf in ("neg_elbo", "recon", "kl") or leaf.startswith("kl_") or re.fullmatch(r"nll_is\d+", leaf):
        return split, "joint", leaf
    return split, "other", leaf


def split_family(split: str) -> str:
    """'test' for test/ and test_class/ (and any test*/), otherwise the split itself."""
    return "test" if split.startswith("test") else split


def is_class_split(split: str) -> bool:
    return split.endswith("_class")


def episode_kind(split: str) -> str:
    return "one-class episodes" if is_class_split(split) else "iid episodes"


def _part_rank(part: str) -> tuple[int, int]:
    if part in ("neg_elbo", "score"):
        return (0, 0)
    if m := re.fullmatch(r"nll_is(\d+)", part):
        return (1, int(m.group(1)))
    return {"recon": (2, 0), "kl": (3, 0)}.get(part, (4, 0))


def _metric_order(name: str) -> tuple[str, int, int, int, str]:
    split, protocol, part = classify(name)
    return (split_family(split), GROUP_RANK[(is_class_split(split), protocol)], *_part_rank(part), name)


def is_core(name: str) -> bool:
    """A main column of table.md: joint neg_elbo/nll_is*/recon/kl, memory_conditional, heldout/heldout_nll_is*."""
    _, protocol, part = classify(name)
    return _part_rank(part)[0] <= CORE_PART_RANK[protocol]


def describe(name: str) -> str:
    """What a metric is, in a few words: 'joint bound -ELBO/T', 'held-out bound -ELBO/target, one-class episodes'."""
    split, protocol, part = classify(name)
    if protocol == "other":
        return name
    if protocol == "memory_conditional":
        what = "memory-conditional score (KL(M) left out, not a bound)"
    else:
        proto, per = ("joint", "/T") if protocol == "joint" else ("held-out", "/target")
        sample = re.fullmatch(r"nll_is(\d+)", part)
        if part == "neg_elbo":
            what = f"{proto} bound -ELBO{per}"
        elif sample:
            what = f"{proto} NLL{per} estimate ({sample.group(1)} importance samples)"
        else:
            what = f"{proto} bound: {part.replace('_', ' ')} term"
    return what + (", one-class episodes" if is_class_split(split) else "")


def _targets_text(targets: list[int]) -> str:
    return f"n={'/'.join(map(str, targets))} " if targets else ""


def column_groups(columns: list[str], heldout_targets: list[int] | tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Consecutive runs of `columns` (already in table order) that share (split, protocol), each with
    its title: [{split, protocol, kind, title, columns, core}]."""
    groups: list[dict[str, Any]] = []
    for c in columns:
        split, protocol, _ = classify(c)
        if not groups or (groups[-1]["split"], groups[-1]["protocol"]) != (split, protocol):
            title = PROTOCOL_TITLES[protocol].format(n=_targets_text(list(heldout_targets)))
            groups.append(
                {
                    "split": split,
                    "protocol": protocol,
                    "kind": episode_kind(split),
                    "title": title,
                    "columns": [],
                    "core": [],
                }
            )
        groups[-1]["columns"].append(c)
        if is_core(c):
            groups[-1]["core"].append(c)
    return groups


# ---- aggregation ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def _mean_of(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _group_key(row: dict[str, Any], by: tuple[str, ...]) -> tuple:
    """(data, model, T, experiment, *by values): runs of one named experiment config (e.g. cpu_dkm_mnist and
    cpu_dkm_sampled_mnist) are never pooled with another's, even where --by does not tell them apart."""
    return (
        str(row["data"]),
        str(row["model"]),
        row["episode_length"],
        row.get("experiment") or "",
        *(json.dumps(_get(row["config"], k), sort_keys=True, default=str) for k in by),
    )


def _experiment_label(experiment: str, data: str) -> str:
    """'cpu_dkm_sampled_mnist' -> 'cpu_dkm_sampled' (the data set is the table's)."""
    return experiment[: -len(data) - 1] if experiment.endswith(f"_{data}") else experiment


def _labels(rows: list[dict[str, Any]], by: tuple[str, ...]) -> dict[tuple, str]:
    """Group key -> legend label: the model, plus T=... when a (data, model) has several episode
    lengths, plus k=v for every --by key."""
    keys = {_group_key(r, by) for r in rows}
    lengths: dict[tuple, set] = {}
    for k in keys:
        lengths.setdefault(k[:2], set()).add(k[2])
    out = {}
    for k in keys:
        parts = [_experiment_label(k[3], k[0]) if k[3] else k[1]]
        if len(lengths[k[:2]]) > 1:
            parts.append(f"T={k[2]}")
        parts += [f"{b.split('.')[-1]}={json.loads(v)}" for b, v in zip(by, k[4:], strict=True)]
        out[k] = parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
    return out


def _make_group(
    key: tuple, rs: list[dict[str, Any]], family: str, by: tuple[str, ...], label: str, unit: str
) -> dict[str, Any]:
    names = sorted({k for r in rs for k in r["metrics"] if split_family(k.split("/")[0]) == family}, key=_metric_order)
    stats = {name: _stats([r["metrics"][name] for r in rs if name in r["metrics"]]) for name in names}
    return {
        "data": key[0],
        "model": key[1],
        "label": label,
        "episode_length": key[2],
        "by": {b: _get(rs[0]["config"], b) for b in by},
        "unit": rs[0]["unit"] or unit,
        "is_samples": sorted({r["is_samples"] for r in rs if r["is_samples"] is not None}),
        "n": len(rs),
        "seeds": sorted((r["seed"] for r in rs), key=str),
        "steps": _mean_of(rs, "steps"),
        "checkpoint_step": _mean_of(rs, "checkpoint_step"),
        "train_seconds": _mean_of(rs, "train_seconds"),
        "steps_values": sorted({int(r["steps"]) for r in rs if r.get("steps") is not None}),
        "heldout_targets": sorted({r["heldout_targets"] for r in rs if r.get("heldout_targets") is not None}),
        "run_dirs": [r["run_dir"] for r in rs],
        "metrics": stats,
        "best": False,
    }


def _steps_text(g: dict[str, Any]) -> str:
    return "/".join(map(str, g["steps_values"])) or "?"


def mark_best(groups: list[dict[str, Any]], metric: str) -> list[str]:
    """Set best=True on the lowest mean of `metric` per data set, where the groups that have it share
    one training budget (the same `steps` wherever known; unknown everywhere counts as shared).
    Returns a note per data set where the budgets differ and nothing is marked."""
    notes = []
    for data in sorted({g["data"] for g in groups}):
        cands = [g for g in groups if g["data"] == data and metric in g["metrics"]]
        if len({s for g in cands for s in g["steps_values"]}) > 1:
            steps = ", ".join(f"{g['label']} {_steps_text(g)}" for g in cands)
            notes.append(f"no best marked for {data}: runs trained for different budgets (steps: {steps})")
            continue
        best = min((g["metrics"][metric]["mean"] for g in cands), default=math.inf)
        for g in cands:
            g["best"] = math.isfinite(best) and g["metrics"][metric]["mean"] == best
    return notes


def aggregate(
    rows: list[dict[str, Any]],
    metric: str = MAIN_METRIC,
    by: tuple[str, ...] | list[str] = (),
    curve_metric: str = CURVE_METRIC,
) -> dict[str, Any]:
    """Pool seeds per (data, model, episode length, *by). Returns a dict:
    groups (sorted by data set, then mean of `metric`; each with data, model, label, unit,
    episode_length, is_samples, n, seeds, steps, train_seconds (means over seeds, None where unknown),
    steps_values, heldout_targets, run_dirs, metrics {name: {mean, std, n}}, best),
    columns (metric names in table order), column_groups (see column_groups()), best_notes,
    curves {data: [{label, epochs, mean, std, n}]}, units {data: unit}, failed / without_eval
    (run dirs left out of the table), metric, by."""
    by = tuple(by)
    family = split_family(metric.split("/", 1)[0])
    failed = [r for r in rows if r["status"] == "failed"]
    live = [r for r in rows if r["status"] != "failed"]
    evaluated = [r for r in live if any(split_family(k.split("/", 1)[0]) == family for k in r["metrics"])]
    without = [r for r in live if r not in evaluated]
    labels = _labels(live, by)

    units: dict[str, str] = {}
    for r in evaluated:
        if r["unit"]:
            units.setdefault(str(r["data"]), r["unit"])
    for r in live:
        units.setdefault(str(r["data"]), UNIT_BY_DATA.get(str(r["data"]), DEFAULT_UNIT))

    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for r in evaluated:
        buckets.setdefault(_group_key(r, by), []).append(r)
    groups = [_make_group(k, rs, family, by, labels[k], units[k[0]]) for k, rs in buckets.items()]

    def main_mean(g: dict[str, Any]) -> float:
        s = g["metrics"].get(metric)
        return s["mean"] if s else math.inf

    groups.sort(key=lambda g: (g["data"], main_mean(g), g["label"]))
    best_notes = mark_best(groups, metric)
    columns = sorted({c for g in groups for c in g["metrics"]}, key=_metric_order)
    targets = sorted({t for g in groups for t in g["heldout_targets"]})
    return {
        "metric": metric,
        "curve_metric": curve_metric,
        "by": list(by),
        "columns": columns,
        "column_groups": column_groups(columns, targets),
        "heldout_targets": targets,
        "groups": groups,
        "units": units,
        "best_notes": best_notes,
        "curves": aggregate_curves(live, curve_metric, by, labels),
        "runs": len(rows),
        "failed": [r["run_dir"] for r in failed],
        "without_eval": [r["run_dir"] for r in without],
    }


def aggregate_curves(
    rows: list[dict[str, Any]],
    key: str = CURVE_METRIC,
    by: tuple[str, ...] = (),
    labels: dict[tuple, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{data: [{label, model, epochs, mean, std, n}]}: `key` per epoch, mean/std over the group's
    runs that reached that epoch (std None where only one did)."""
    labels = labels or _labels(rows, by)
    per: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        pts = r["curves"].get(key) or []
        if pts:
            d = per.setdefault(_group_key(r, by), {})
            for e, v in pts:
                d.setdefault(int(e), []).append(v)
    out: dict[str, list[dict[str, Any]]] = {}
    for gk in sorted(per, key=lambda k: (k[0], labels[k])):
        d = per[gk]
        eps = sorted(d)
        st = [_stats(d[e]) for e in eps]
        out.setdefault(gk[0], []).append(
            {
                "label": labels[gk],
                "model": gk[1],
                "epochs": eps,
                "mean": [s["mean"] for s in st],
                "std": [s["std"] for s in st],
                "n": [s["n"] for s in st],
            }
        )
    return out


# ---- tables -------------------------------------------------------------------------------------

DOC_BEGIN = "<!-- km compare: begin -->"
DOC_END = "<!-- km compare: end -->"


def _decimals(unit: str | None) -> int:
    return 3 if unit == "bits/dim" else 2


def _table_columns(agg: dict[str, Any]) -> list[str]:
    """Columns shown in table.md: the main ones of each protocol group (+ --metric); table.csv has all."""
    return [c for c in agg["columns"] if is_core(c) or c == agg["metric"]]


def _info_columns(groups: list[dict[str, Any]]) -> list[str]:
    """'steps' / 'train s' where any group knows them."""
    heads = (("steps", "steps"), ("ckpt step", "checkpoint_step"), ("train s", "train_seconds"))
    return [h for h, k in heads if any(g[k] is not None for g in groups)]


def _fmt_info(g: dict[str, Any], head: str) -> str:
    if head in ("steps", "ckpt step"):
        v = g["steps" if head == "steps" else "checkpoint_step"]
        return "" if v is None else f"{v:.0f}" if v == round(v) else f"{v:.1f}"
    v = g["train_seconds"]
    return "" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _cell(g: dict[str, Any], c: str, metric: str) -> str:
    s = g["metrics"].get(c)
    if not s:
        return ""
    dec = _decimals(g["unit"])
    txt = f"{s['mean']:.{dec}f} ± " + (f"{s['std']:.{dec}f}" if s["std"] is not None else "-")
    if s["n"] != g["n"]:
        txt += f" (n={s['n']})"
    return f"**{txt}**" if g["best"] and c == metric else txt


def _md_table(head: list[str], rows: list[list[str]], n_right: int) -> list[str]:
    esc = [[x.replace("|", "\\|") for x in r] for r in [head, *rows]]
    align = ["---"] * (len(head) - n_right) + ["---:"] * n_right
    return ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(align) + "|"] + [
        "| " + " | ".join(r) + " |" for r in esc[1:]
    ]


def format_legend(agg: dict[str, Any], shown: list[str] | None = None) -> list[str]:
    """One line per column group (of the columns in `shown`, default table.md's) naming its protocol."""
    shown = _table_columns(agg) if shown is None else shown
    lines = []
    for grp in agg["column_groups"]:
        cols = [c for c in grp["columns"] if c in shown]
        if cols:
            lines.append(f"- {grp['kind']} ({grp['split']}/), {grp['title']}: {', '.join(cols)}")
    return ["Column groups (lower is better; every column belongs to exactly one protocol):", *lines] if lines else []


def format_markdown(agg: dict[str, Any]) -> str:
    """The column-group legend and the table (one row per group, every data set)."""
    cols = _table_columns(agg)
    by, info = agg["by"], _info_columns(agg["groups"])
    head = ["data", "model", *by, "unit", "T", "IS", "n", *info, *cols]
    rows = []
    for g in agg["groups"]:
        model = f"**{g['model']}**" if g["best"] else g["model"]
        rows.append(
            [
                g["data"],
                model,
                *(str(g["by"].get(b)) for b in by),
                g["unit"] or "",
                str(g["episode_length"]),
                "/".join(map(str, g["is_samples"])),
                str(g["n"]),
                *(_fmt_info(g, h) for h in info),
                *(_cell(g, c, agg["metric"]) for c in cols),
            ]
        )
    return "\n".join([*format_legend(agg, cols), "", *_md_table(head, rows, len(info) + len(cols))]) + "\n"


def _best_line(agg: dict[str, Any]) -> str:
    return (
        f"Bold = best: the lowest {agg['metric']} ({describe(agg['metric'])}) per data set, marked only where "
        "the groups compared trained for the same number of steps (steps trained, from metrics.csv or eval.json)."
    )


def _doc_header(name: str, unit: str) -> str:
    """Column header for --doc tables: protocol group, quantity, unit, e.g. 'held-out (class) NLL IS20 [nats/image]'."""
    split, protocol, part = classify(name)
    if protocol == "other":
        return f"{name} [{unit}]"
    per = "/T" if protocol == "joint" else "/target"
    sample = re.fullmatch(r"nll_is(\d+)", part)
    what = {"neg_elbo": f"-ELBO{per}", "score": "", "recon": "recon", "kl": "KL"}.get(part)
    if what is None:
        what = f"NLL IS{sample.group(1)}" if sample else part.replace("kl_", "KL ").replace("_", " ")
    kind = " (class)" if is_class_split(split) else ""
    return " ".join(x for x in (f"{SHORT_NAMES[protocol]}{kind}", what, f"[{unit}]") if x)


def _doc_columns(agg: dict[str, Any]) -> list[str]:
    """table.md's main columns less the joint and memory-conditional numbers of one-class episodes (the
    held-out one is what those episodes are for; the rest stay in table.csv), so a page table stays readable."""
    keep = []
    for c in _table_columns(agg):
        split, protocol, _ = classify(c)
        if c == agg["metric"] or not is_class_split(split) or protocol == "heldout":
            keep.append(c)
    return keep


def _per_data_set(agg: dict[str, Any], columns: list[str]):
    """(data set, its groups, its unit, the `columns` any of its groups has), per data set in order."""
    for data in sorted({g["data"] for g in agg["groups"]}):
        gs = [g for g in agg["groups"] if g["data"] == data]
        unit = gs[0]["unit"] or agg["units"].get(data, DEFAULT_UNIT)
        yield data, gs, unit, [c for c in columns if any(c in g["metrics"] for g in gs)]


def format_doc_tables(agg: dict[str, Any]) -> list[str]:
    """One markdown table per data set: rows = groups, columns = the main metrics by protocol group."""
    lines = []
    for data, gs, unit, cols in _per_data_set(agg, _doc_columns(agg)):
        info = _info_columns(gs)
        head = ["model", *agg["by"], "n", "T", "IS", *info, *(_doc_header(c, unit) for c in cols)]
        rows = [
            [
                f"**{g['label']}**" if g["best"] else g["label"],
                *(str(g["by"].get(b)) for b in agg["by"]),
                str(g["n"]),
                str(g["episode_length"]),
                "/".join(map(str, g["is_samples"])),
                *(_fmt_info(g, h) for h in info),
                *(_cell(g, c, agg["metric"]) for c in cols),
            ]
            for g in gs
        ]
        lines += [
            f"**{data}** ({unit}, sorted by {agg['metric']})",
            "",
            *_md_table(head, rows, 3 + len(info) + len(cols)),
            "",
        ]
    return lines


def term_columns(agg: dict[str, Any]) -> list[str]:
    """The terms of the bounds, for the term-by-term tables: reconstruction and each KL part of the joint
    bound (iid episodes) and of the held-out bound (each episode kind), in table order."""
    cols = []
    for c in agg["columns"]:
        split, protocol, part = classify(c)
        wanted = protocol == "heldout" or (protocol == "joint" and not is_class_split(split))
        if wanted and (part == "recon" or part.startswith("kl_")):
            cols.append(c)
    return cols


def format_doc_terms(agg: dict[str, Any]) -> list[str]:
    """Per data set, the bounds term by term (mean over seeds): where each model's nats go."""
    lines = []
    for data, gs, unit, cols in _per_data_set(agg, term_columns(agg)):
        if not cols:
            continue
        dec = _decimals(unit)
        head = ["model", *agg["by"], *(_doc_header(c, unit) for c in cols)]
        rows = [
            [
                g["label"],
                *(str(g["by"].get(b)) for b in agg["by"]),
                *(f"{g['metrics'][c]['mean']:.{dec}f}" if c in g["metrics"] else "" for c in cols),
            ]
            for g in gs
        ]
        lines += [
            f"**{data}, term by term** ({unit}, mean over seeds; KL M = KL(M)/T, in the joint bound only)",
            "",
            *_md_table(head, rows, len(cols)),
            "",
        ]
    return lines


def format_doc_block(agg: dict[str, Any], command: str, date: str) -> str:
    """The marked block --doc writes: command + date, legend, one table per data set, notes."""
    return "\n".join(
        [
            DOC_BEGIN,
            "<!-- generated: everything between these markers is replaced by the command below -->",
            "",
            f"Regenerate with `{command}` ({date}). Mean ± std over seeds (sample std; '-' = one run).",
            _best_line(agg),
            "",
            *format_legend(agg),
            "",
            *format_doc_tables(agg),
            *format_doc_terms(agg),
            *(f"- {n}" for n in _notes(agg)),
            DOC_END,
        ]
    )


def splice_doc(text: str | None, block: str, path: Path) -> str:
    """`text` with its marked block replaced by `block` (the block appended where there is none;
    just the block for a missing file)."""
    if text is None:
        return block + "\n"
    begin = text.find(DOC_BEGIN)
    if begin < 0:
        sep = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        return text + sep + block + "\n"
    end = text.find(DOC_END, begin)
    if end < 0:
        raise _error(f"--doc {path}: '{DOC_BEGIN}' without '{DOC_END}' after it; fix the markers by hand")
    return text[:begin] + block + text[end + len(DOC_END) :]


def write_doc(path: Path, block: str) -> None:
    """Replace the marked block of the markdown file `path` by `block`, atomically (temp file + os.replace)."""
    real = Path(os.path.realpath(path))
    try:
        old: str | None = real.read_text()
    except FileNotFoundError:
        old = None
    new = splice_doc(old, block, path)
    atomic_write_text(real, new)


def write_csv(agg: dict[str, Any], path: Path) -> None:
    by = agg["by"]
    head = [
        "data",
        "model",
        "label",
        *by,
        "unit",
        "episode_length",
        "is_samples",
        "n",
        "seeds",
        "steps",
        "train_seconds",
        "heldout_targets",
        "best",
    ]
    for c in agg["columns"]:
        head += [f"{c} mean", f"{c} std", f"{c} n"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for g in agg["groups"]:
            row = [
                g["data"],
                g["model"],
                g["label"],
                *(g["by"].get(b) for b in by),
                g["unit"],
                g["episode_length"],
                "/".join(map(str, g["is_samples"])),
                g["n"],
                " ".join(map(str, g["seeds"])),
                *("" if g[k] is None else repr(g[k]) for k in ("steps", "train_seconds")),
                "/".join(map(str, g["heldout_targets"])),
                int(g["best"]),
            ]
            for c in agg["columns"]:
                s = g["metrics"].get(c)
                row += ["", "", 0] if not s else [repr(s["mean"]), "" if s["std"] is None else repr(s["std"]), s["n"]]
            w.writerow(row)


# ---- plots --------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def plot_curves(agg: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    key = agg["curve_metric"]
    from matplotlib import colormaps

    labels = sorted({c["label"] for ls in agg["curves"].values() for c in ls})
    many = colormaps["tab20"]  # 20 distinct colours where the default cycle's 10 would repeat
    palette = {lab: f"C{i}" if len(labels) <= 10 else many(i % 20) for i, lab in enumerate(labels)}
    for data, lines in sorted(agg["curves"].items()):
        fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        for c in lines:
            color = palette[c["label"]]  # the same colour for a model in every curves_<data>.png
            lo_n, hi_n = min(c["n"]), max(c["n"])
            n_txt = f"n={hi_n}" if lo_n == hi_n else f"n={lo_n}-{hi_n}"
            ax.plot(
                c["epochs"],
                c["mean"],
                color=color,
                marker="o" if len(c["epochs"]) <= 30 else None,
                ms=3.5,
                lw=1.8,
                label=f"{c['label']} ({n_txt})",
            )
            lo = [m - s if s is not None else m for m, s in zip(c["mean"], c["std"], strict=True)]
            hi = [m + s if s is not None else m for m, s in zip(c["mean"], c["std"], strict=True)]
            if any(s is not None for s in c["std"]):
                ax.fill_between(c["epochs"], lo, hi, color=color, alpha=0.2, lw=0)
        unit = agg["units"].get(data, DEFAULT_UNIT)
        ax.set_title(f"{data}: {key} ({unit})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(textwrap.fill(f"{key}: {describe(key)} [{unit}]", 50), fontsize=8)
        ax.grid(alpha=0.3)
        if all(float(e).is_integer() for c in lines for e in c["epochs"]):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title="mean ± std over seeds", fontsize=8, title_fontsize=8)
        p = out / f"curves_{_safe(data)}.png"
        fig.savefig(p)
        paths.append(p)
    return paths


def bar_label(metric: str, unit: str | None = None) -> str:
    """Axis label of the bar chart: 'test/neg_elbo: joint bound -ELBO/T [nats/image]'."""
    return f"{metric}: {describe(metric)}" + (f" [{unit}]" if unit else "")


def plot_bars(agg: dict[str, Any], out: Path) -> Path | None:
    from matplotlib.figure import Figure

    metric = agg["metric"]
    per: dict[str, list[dict[str, Any]]] = {}
    for g in agg["groups"]:
        if metric in g["metrics"]:
            per.setdefault(g["data"], []).append(g)
    if not per:
        return None
    datas = sorted(per)
    widths = [max(2.2, 0.9 * len(per[d]) + 1.2) for d in datas]
    fig = Figure(figsize=(max(5.0, sum(widths) + 0.6), 4.2), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(datas), squeeze=False, width_ratios=widths)[0]
    for ax, data in zip(axes, datas, strict=True):
        gs = per[data]
        means = [g["metrics"][metric]["mean"] for g in gs]
        stds = [g["metrics"][metric]["std"] or 0.0 for g in gs]
        colors = ["C1" if g["best"] else "C0" for g in gs]
        xs = list(range(len(gs)))
        ax.bar(xs, means, color=colors, width=0.65)
        err = [
            (x, m, s) for x, m, s, g in zip(xs, means, stds, gs, strict=True) if g["metrics"][metric]["std"] is not None
        ]
        if err:  # no error bar where a single run leaves the std undefined
            ax.errorbar(
                [e[0] for e in err],
                [e[1] for e in err],
                yerr=[e[2] for e in err],
                fmt="none",
                ecolor="0.15",
                capsize=4,
                lw=1.2,
            )
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        hi = max(m + s for m, s in zip(means, stds, strict=True))
        span = (hi - lo) or abs(hi) * 0.05 or 1.0
        bottom = max(0.0, lo - 0.6 * span) if lo > 0 else lo - 0.6 * span
        ax.set_ylim(bottom, hi + 0.35 * span)
        dec = _decimals(gs[0]["unit"])
        for x, m, s in zip(xs, means, stds, strict=True):
            ax.text(x, m + s + 0.04 * span, f"{m:.{dec}f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [f"{g['label']}\nn={g['n']}" for g in gs], fontsize=8)
        ax.set_title(data)
        ax.set_ylabel(textwrap.fill(bar_label(metric, gs[0]["unit"]), 50), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    chars = int(fig.get_figwidth() * 13)  # what fits on one line at fontsize 9
    fig.suptitle(
        textwrap.fill(f"{bar_label(metric)}: mean ± std over seeds", chars)
        + "\n"
        + textwrap.fill("(lower is better; best per data set in orange where the budgets match; y axis zoomed)", chars),
        fontsize=9,
    )
    p = out / "metric_bars.png"  # the bars show --metric, whatever its protocol (the axis says which)
    fig.savefig(p)
    return p


def write_outputs(agg: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write table.md, table.csv, curves_<data>.png, metric_bars.png, summary.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md = format_markdown(agg)
    notes = _notes(agg)
    title = f"# {agg['metric']}: {describe(agg['metric'])} (mean ± std over seeds, sample std; '-' = one run)"
    (out / "table.md").write_text(
        f"{title}\n\n{_best_line(agg)}\n\n" + md + ("\n" + "\n".join(notes) + "\n" if notes else "")
    )
    write_csv(agg, out / "table.csv")
    curves = plot_curves(agg, out)
    bars = plot_bars(agg, out)
    run_rows = [{k: v for k, v in r.items() if k not in ("config", "curves")} for r in rows]
    summary = {**agg, "notes": notes, "run_rows": run_rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {
        "table_md": out / "table.md",
        "table_csv": out / "table.csv",
        "curves": curves,
        "bars": bars,
        "summary": out / "summary.json",
        "markdown": md,
        "notes": notes,
    }


def _notes(agg: dict[str, Any]) -> list[str]:
    notes = list(agg["best_notes"])
    if agg["without_eval"]:
        notes.append(
            f"{len(agg['without_eval'])} run(s) without {_family_of(agg['metric'])} results in eval.json "
            f"(left out of the table, curves only): " + ", ".join(agg["without_eval"])
        )
    if agg["failed"]:
        notes.append(f"{len(agg['failed'])} failed run(s) left out: " + ", ".join(agg["failed"]))
    return notes


def _family_of(metric: str) -> str:
    return split_family(metric.split("/", 1)[0])


# ---- CLI ----------------------------------------------------------------------------------------


class _Store(argparse.Action):
    """argparse's 'store' that also records the tokens it consumed in namespace.compare_argv, so that
    --doc can write the command that regenerates the document."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self._value(namespace, values))
        _record(namespace, option_string, values)

    def _value(self, namespace: argparse.Namespace, values: Any) -> Any:
        return values


class _Append(_Store):
    """argparse's 'append' (fresh list per parse) that records its tokens like _Store."""

    def _value(self, namespace: argparse.Namespace, values: Any) -> Any:
        return [*(getattr(namespace, self.dest, None) or []), values]


def _record(namespace: argparse.Namespace, option_string: str | None, values: Any) -> None:
    tokens = [option_string] if option_string else []
    tokens += [str(v) for v in (values if isinstance(values, list) else [values]) if v is not None]
    namespace.compare_argv = [*(getattr(namespace, "compare_argv", None) or []), *tokens]


def command_line(args: argparse.Namespace) -> str:
    """'km compare ...' as given (from the tokens argparse consumed; rebuilt from targets + --doc when
    args did not come through add_arguments' parser)."""
    argv = getattr(args, "compare_argv", None) or [*args.targets, *(["--doc", str(args.doc)] if args.doc else [])]
    return shlex.join(["km", "compare", *argv])


def _today() -> str:
    return time.strftime("%Y-%m-%d")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(compare_argv=[])
    p.add_argument(
        "targets",
        nargs="*",
        metavar="TARGET",
        action=_Store,
        help="run dirs, sweep dirs, parent dirs or globs (quote them: 'runs/cmp/*')",
    )
    p.add_argument(
        "--out", default=None, action=_Store, help="output dir (default runs/compare/<timestamp>, or <sweep>/compare)"
    )
    p.add_argument(
        "--metric", default=MAIN_METRIC, action=_Store, help=f"main metric: sort, best, bars (default {MAIN_METRIC})"
    )
    p.add_argument(
        "--curve-metric", default=CURVE_METRIC, action=_Store, help=f"learning-curve metric (default {CURVE_METRIC})"
    )
    p.add_argument(
        "--by",
        action=_Append,
        default=[],
        metavar="KEY",
        help="also group by this config key, e.g. --by model.lr (repeatable)",
    )
    p.add_argument(
        "--wandb",
        default=None,
        metavar="[ENTITY/]PROJECT",
        action=_Store,
        help="read runs from the W&B API instead of run directories (needs network + login)",
    )
    p.add_argument(
        "--doc",
        default=None,
        metavar="PATH",
        action=_Store,
        help=f"also write the tables into this markdown file, between '{DOC_BEGIN}' and "
        f"'{DOC_END}' (only that block is replaced; appended / created where missing)",
    )


def default_out(targets: list[str]) -> Path:
    if len(targets) == 1 and not any(c in targets[0] for c in "*?[") and is_sweep_dir(Path(targets[0])):
        return Path(targets[0]) / "compare"
    return Path("runs") / "compare" / time.strftime("%Y%m%d-%H%M%S")


def main(args: argparse.Namespace) -> None:
    if args.wandb:
        rows = collect_wandb(args.wandb, args.curve_metric)
    elif args.targets:
        rows = collect(args.targets)
    else:
        raise _error("km compare needs a TARGET (run dir, sweep dir, parent dir or glob) or --wandb PROJECT")
    if "/" not in args.metric:
        raise _error(f"--metric must look like 'test/neg_elbo', got '{args.metric}'")
    agg = aggregate(rows, args.metric, args.by, args.curve_metric)
    if not agg["groups"] and not agg["curves"]:
        raise _error(
            f"{len(rows)} run(s) found but none has {_family_of(args.metric)} results in eval.json "
            f"or {args.curve_metric} in metrics.csv"
        )
    doc = getattr(args, "doc", None)
    if doc:  # first: a document with broken markers stops the command before anything is written
        write_doc(Path(doc), format_doc_block(agg, command_line(args), _today()))
    out = Path(args.out) if args.out else default_out(args.targets)
    res = write_outputs(agg, rows, out)
    n_eval = sum(g["n"] for g in agg["groups"])
    print(f"{len(rows)} run(s), {n_eval} with {_family_of(args.metric)} results, {len(agg['groups'])} group(s)")
    if agg["groups"]:
        print(res["markdown"], end="")
    else:
        print(f"(no table: no run has {_family_of(args.metric)} results in eval.json)")
    for n in res["notes"]:
        print(n)
    print(
        f"wrote {out}/: table.md table.csv summary.json "
        + " ".join(p.name for p in [*res["curves"], *([res["bars"]] if res["bars"] else [])])
    )
    if doc:
        print(f"wrote {doc}: tables between '{DOC_BEGIN}' and '{DOC_END}'")
    sys.stdout.flush()
