"""`km compare`: tables and plots across runs.

    km compare TARGET... [--out DIR] [--metric test/neg_elbo] [--curve-metric val/neg_elbo] [--by KEY]
    km compare --wandb ENTITY/PROJECT [...]

TARGETs are run directories (a directory holding config.yaml), sweep directories (holding state.json:
the `run_dir` of each entry in its `runs` is used; without any, the directory is searched), parent
directories (searched for */config.yaml, skipping wandb/, checkpoints/, samples/) or globs ('runs/cmp/*').

Runs are grouped by (data set, model, episode length[, --by config keys]); the seeds of a group are
pooled. Test numbers come from each run's eval.json (written by `km train` / `km eval`); runs without
one (or whose eval.json is for another split) are counted and left out of the table but their
metrics.csv still feeds the learning curves. Failed runs (run.json status 'failed') are left out of
both. Written into --out (default runs/compare/<timestamp>, or <sweep dir>/compare for one sweep dir):

    table.md / table.csv   one row per group: mean ± std over seeds for every test metric, n, unit,
                           episode length T, IS sample count; sorted by data set, then the mean of
                           --metric; the best group per data set (lowest --metric) is bold in
                           table.md and has best=1 in table.csv.
    curves_<data>.png      --curve-metric vs epoch per data set, one line per group (mean over seeds,
                           shaded ± std where two or more seeds reach that epoch).
    nll_bars.png           --metric per group, one subplot per data set (units differ), error bars =
                           std over seeds, n under each bar; the y axis is zoomed onto the bars.
    summary.json           the same numbers, machine readable (groups, per-run rows, curves).

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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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
    try:
        state = json.loads((sweep / "state.json").read_text())
    except (OSError, ValueError):
        return []
    runs = state.get("runs") if isinstance(state, dict) else state
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


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_curves(metrics_csv: Path, prefix: str = "val/") -> dict[str, list[list[float]]]:
    """{metric: [[epoch, value], ...]} for every `prefix` column of a CSVLogger metrics.csv (rows
    are sparse: a value counts only where present; a repeated epoch keeps its last value)."""
    per: dict[str, dict[int, float]] = {}
    try:
        with open(metrics_csv, newline="") as f:
            for rec in csv.DictReader(f):
                ep = _finite(rec.get("epoch"))
                if ep is None:
                    continue
                for k, v in rec.items():
                    if k and k.startswith(prefix) and v not in (None, ""):
                        fv = _finite(v)
                        if fv is not None:
                            per.setdefault(k, {})[int(ep)] = fv
    except (OSError, csv.Error):
        return {}
    return {k: [[e, d[e]] for e in sorted(d)] for k, d in per.items()}


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
    meta = _read_json(run_dir / "run.json") or {}
    ev = _read_json(run_dir / "eval.json")
    metrics = {}
    if ev and isinstance(ev.get("metrics"), dict):
        metrics = {k: f for k, v in ev["metrics"].items() if (f := _finite(v)) is not None}
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
        "metrics": metrics,
        "curves": read_curves(run_dir / "metrics.csv"),
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
        try:
            summary = dict(r.summary._json_dict)
        except AttributeError:
            summary = {k: r.summary[k] for k in r.summary.keys()}
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
        rows.append({
            "run_dir": f"wandb:{project}/{r.id}", "name": _get(cfg, "name", r.name), "run_id": r.id,
            "model": _get(cfg, "model.name") or "?", "data": data, "seed": _get(cfg, "seed"),
            "status": {"crashed": "failed"}.get(r.state, r.state), "error": None,
            "episode_length": _get(cfg, "data.episode_length"), "split": None,
            "unit": summary.get("unit") or UNIT_BY_DATA.get(data, DEFAULT_UNIT),
            "is_samples": _get(cfg, "eval.is_samples"), "episodes": None,
            "metrics": {k: f for k, v in summary.items()
                        if "/" in k and not isinstance(v, bool) and (f := _finite(v)) is not None},
            "curves": {curve_metric: curve} if curve else {}, "config": cfg,
        })
    return rows


# ---- aggregation ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _metric_order(name: str) -> tuple[int, int, str]:
    leaf = name.split("/", 1)[-1]
    if leaf == "neg_elbo":
        return (0, 0, name)
    if m := re.fullmatch(r"nll_is(\d+)", leaf):
        return (1, int(m.group(1)), name)
    return {"recon": (2, 0, name), "kl": (3, 0, name)}.get(leaf, (4, 0, name))


def _group_key(row: dict[str, Any], by: tuple[str, ...]) -> tuple:
    return (str(row["data"]), str(row["model"]), row["episode_length"],
            *(json.dumps(_get(row["config"], k), sort_keys=True, default=str) for k in by))


def _labels(rows: list[dict[str, Any]], by: tuple[str, ...]) -> dict[tuple, str]:
    """Group key -> legend label: the model, plus T=... when a (data, model) has several episode
    lengths, plus k=v for every --by key."""
    keys = {_group_key(r, by) for r in rows}
    lengths: dict[tuple, set] = {}
    for k in keys:
        lengths.setdefault(k[:2], set()).add(k[2])
    out = {}
    for k in keys:
        parts = [k[1]]
        if len(lengths[k[:2]]) > 1:
            parts.append(f"T={k[2]}")
        parts += [f"{b.split('.')[-1]}={json.loads(v)}" for b, v in zip(by, k[3:], strict=True)]
        out[k] = parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
    return out


def aggregate(rows: list[dict[str, Any]], metric: str = MAIN_METRIC, by: tuple[str, ...] | list[str] = (),
              curve_metric: str = CURVE_METRIC) -> dict[str, Any]:
    """Pool seeds per (data, model, episode length, *by). Returns a dict:
    groups (sorted by data set, then mean of `metric`; each with data, model, label, unit,
    episode_length, is_samples, n, seeds, run_dirs, metrics {name: {mean, std, n}}, best),
    columns (metric names in table order), curves {data: [{label, epochs, mean, std, n}]},
    units {data: unit}, failed / without_eval (run dirs left out of the table), metric, by."""
    by = tuple(by)
    split = metric.split("/", 1)[0] + "/"
    failed = [r for r in rows if r["status"] == "failed"]
    live = [r for r in rows if r["status"] != "failed"]
    evaluated = [r for r in live if any(k.startswith(split) for k in r["metrics"])]
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
    groups = []
    columns: set[str] = set()
    for key, rs in buckets.items():
        names = sorted({k for r in rs for k in r["metrics"] if k.startswith(split)}, key=_metric_order)
        columns.update(names)
        stats = {}
        for name in names:
            vals = [r["metrics"][name] for r in rs if name in r["metrics"]]
            stats[name] = _stats(vals)
        groups.append({
            "data": key[0], "model": key[1], "label": labels[key], "episode_length": key[2],
            "by": {b: _get(rs[0]["config"], b) for b in by},
            "unit": rs[0]["unit"] or units[key[0]],
            "is_samples": sorted({r["is_samples"] for r in rs if r["is_samples"] is not None}),
            "n": len(rs), "seeds": sorted((r["seed"] for r in rs), key=str),
            "run_dirs": [r["run_dir"] for r in rs], "metrics": stats, "best": False,
        })

    def main_mean(g: dict[str, Any]) -> float:
        s = g["metrics"].get(metric)
        return s["mean"] if s else math.inf

    groups.sort(key=lambda g: (g["data"], main_mean(g), g["label"]))
    for data in {g["data"] for g in groups}:
        best = min((main_mean(g) for g in groups if g["data"] == data), default=math.inf)
        for g in groups:
            if g["data"] == data and math.isfinite(best) and main_mean(g) == best:
                g["best"] = True

    return {
        "metric": metric, "curve_metric": curve_metric, "by": list(by),
        "columns": sorted(columns, key=_metric_order), "groups": groups, "units": units,
        "curves": aggregate_curves(live, curve_metric, by, labels),
        "runs": len(rows), "failed": [r["run_dir"] for r in failed],
        "without_eval": [r["run_dir"] for r in without],
    }


def aggregate_curves(rows: list[dict[str, Any]], key: str = CURVE_METRIC, by: tuple[str, ...] = (),
                     labels: dict[tuple, str] | None = None) -> dict[str, list[dict[str, Any]]]:
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
        out.setdefault(gk[0], []).append({
            "label": labels[gk], "model": gk[1], "epochs": eps, "mean": [s["mean"] for s in st],
            "std": [s["std"] for s in st], "n": [s["n"] for s in st],
        })
    return out


# ---- output -----------------------------------------------------------------------------------


def _decimals(unit: str | None) -> int:
    return 3 if unit == "bits/dim" else 2


def _table_columns(agg: dict[str, Any]) -> list[str]:
    """Columns shown in table.md: neg_elbo, nll_is*, recon, kl (+ --metric); table.csv has all."""
    core = [c for c in agg["columns"] if _metric_order(c)[0] < 4 or c == agg["metric"]]
    return core


def format_markdown(agg: dict[str, Any]) -> str:
    cols = _table_columns(agg)
    by = agg["by"]
    head = ["data", "model", *by, "unit", "T", "IS", "n", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (len(head) - len(cols)) + ["---:"] * len(cols)) + "|"]
    for g in agg["groups"]:
        dec = _decimals(g["unit"])
        cells = []
        for c in cols:
            s = g["metrics"].get(c)
            if not s:
                cells.append("")
                continue
            txt = f"{s['mean']:.{dec}f} ± " + (f"{s['std']:.{dec}f}" if s["std"] is not None else "-")
            if s["n"] != g["n"]:
                txt += f" (n={s['n']})"
            if g["best"] and c == agg["metric"]:
                txt = f"**{txt}**"
            cells.append(txt)
        model = f"**{g['model']}**" if g["best"] else g["model"]
        row = [g["data"], model, *(str(g["by"].get(b)) for b in by), g["unit"] or "", str(g["episode_length"]),
               "/".join(map(str, g["is_samples"])), str(g["n"]), *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(agg: dict[str, Any], path: Path) -> None:
    by = agg["by"]
    head = ["data", "model", "label", *by, "unit", "episode_length", "is_samples", "n", "seeds", "best"]
    for c in agg["columns"]:
        head += [f"{c} mean", f"{c} std", f"{c} n"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for g in agg["groups"]:
            row = [g["data"], g["model"], g["label"], *(g["by"].get(b) for b in by), g["unit"], g["episode_length"],
                   "/".join(map(str, g["is_samples"])), g["n"], " ".join(map(str, g["seeds"])), int(g["best"])]
            for c in agg["columns"]:
                s = g["metrics"].get(c)
                row += ["", "", 0] if not s else [repr(s["mean"]), "" if s["std"] is None else repr(s["std"]), s["n"]]
            w.writerow(row)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def plot_curves(agg: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    key = agg["curve_metric"]
    palette = {lab: f"C{i % 10}" for i, lab in enumerate(sorted({c["label"] for ls in agg["curves"].values() for c in ls}))}
    for data, lines in sorted(agg["curves"].items()):
        fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        for c in lines:
            color = palette[c["label"]]  # the same colour for a model in every curves_<data>.png
            lo_n, hi_n = min(c["n"]), max(c["n"])
            n_txt = f"n={hi_n}" if lo_n == hi_n else f"n={lo_n}-{hi_n}"
            ax.plot(c["epochs"], c["mean"], color=color, marker="o" if len(c["epochs"]) <= 30 else None,
                    ms=3.5, lw=1.8, label=f"{c['label']} ({n_txt})")
            lo = [m - s if s is not None else m for m, s in zip(c["mean"], c["std"], strict=True)]
            hi = [m + s if s is not None else m for m, s in zip(c["mean"], c["std"], strict=True)]
            if any(s is not None for s in c["std"]):
                ax.fill_between(c["epochs"], lo, hi, color=color, alpha=0.2, lw=0)
        unit = agg["units"].get(data, DEFAULT_UNIT)
        ax.set_title(f"{data}: {key} ({unit})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} [{unit}]")
        ax.grid(alpha=0.3)
        if all(float(e).is_integer() for c in lines for e in c["epochs"]):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title="mean ± std over seeds", fontsize=8, title_fontsize=8)
        p = out / f"curves_{_safe(data)}.png"
        fig.savefig(p)
        paths.append(p)
    return paths


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
        err = [(x, m, s) for x, m, s, g in zip(xs, means, stds, gs, strict=True)
               if g["metrics"][metric]["std"] is not None]
        if err:  # no error bar where a single run leaves the std undefined
            ax.errorbar([e[0] for e in err], [e[1] for e in err], yerr=[e[2] for e in err], fmt="none",
                        ecolor="0.15", capsize=4, lw=1.2)
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
        ax.set_ylabel(f"{metric} [{gs[0]['unit']}]")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{metric}: mean ± std over seeds\n(lower is better; best per data set in orange; y axis zoomed)",
                 fontsize=9)
    p = out / "nll_bars.png"
    fig.savefig(p)
    return p


def write_outputs(agg: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write table.md, table.csv, curves_<data>.png, nll_bars.png, summary.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md = format_markdown(agg)
    notes = _notes(agg)
    (out / "table.md").write_text(f"# {agg['metric']} (mean ± std over seeds, sample std; '-' = one run)\n\n"
                                  + md + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    write_csv(agg, out / "table.csv")
    curves = plot_curves(agg, out)
    bars = plot_bars(agg, out)
    run_rows = [{k: v for k, v in r.items() if k not in ("config", "curves")} for r in rows]
    summary = {**agg, "run_rows": run_rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {"table_md": out / "table.md", "table_csv": out / "table.csv", "curves": curves, "bars": bars,
            "summary": out / "summary.json", "markdown": md, "notes": notes}


def _notes(agg: dict[str, Any]) -> list[str]:
    notes = []
    if agg["without_eval"]:
        notes.append(f"{len(agg['without_eval'])} run(s) without {agg['metric'].split('/')[0]} results in eval.json "
                     f"(left out of the table, curves only): " + ", ".join(agg["without_eval"]))
    if agg["failed"]:
        notes.append(f"{len(agg['failed'])} failed run(s) left out: " + ", ".join(agg["failed"]))
    return notes


# ---- CLI ----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="run dirs, sweep dirs, parent dirs or globs (quote them: 'runs/cmp/*')")
    p.add_argument("--out", default=None, help="output dir (default runs/compare/<timestamp>, or <sweep>/compare)")
    p.add_argument("--metric", default=MAIN_METRIC, help=f"main metric: sort, best, bars (default {MAIN_METRIC})")
    p.add_argument("--curve-metric", default=CURVE_METRIC, help=f"learning-curve metric (default {CURVE_METRIC})")
    p.add_argument("--by", action="append", default=[], metavar="KEY",
                   help="also group by this config key, e.g. --by model.lr (repeatable)")
    p.add_argument("--wandb", default=None, metavar="[ENTITY/]PROJECT",
                   help="read runs from the W&B API instead of run directories (needs network + login)")


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
        raise _error(f"{len(rows)} run(s) found but none has {args.metric.split('/')[0]} results in eval.json "
                     f"or {args.curve_metric} in metrics.csv")
    out = Path(args.out) if args.out else default_out(args.targets)
    res = write_outputs(agg, rows, out)
    n_eval = sum(g["n"] for g in agg["groups"])
    print(f"{len(rows)} run(s), {n_eval} with {args.metric.split('/')[0]} results, "
          f"{len(agg['groups'])} group(s)")
    if agg["groups"]:
        print(res["markdown"], end="")
    else:
        print(f"(no table: no run has {args.metric.split('/')[0]} results in eval.json)")
    for n in res["notes"]:
        print(n)
    print(f"wrote {out}/: table.md table.csv summary.json "
          + " ".join(p.name for p in [*res["curves"], *([res["bars"]] if res["bars"] else [])]))
    sys.stdout.flush()
