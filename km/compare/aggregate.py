"""Aggregating: every metric's protocol group and column order (`classify`, `column_groups`), and the seeds of
each (data set, model, episode length, experiment[, --by keys]) pooled into mean ± std (`aggregate`,
`aggregate_curves`), with the best group per data set marked where the budgets match. Standard library only."""

from __future__ import annotations

import json
import math
import re
import statistics
from typing import Any

from km.compare.row import CURVE_METRIC, DEFAULT_UNIT, MAIN_METRIC, UNIT_BY_DATA, RunRow, _get

# ---- protocols ----------------------------------------------------------------------------------

PROTOCOL_TITLES = {
    "joint": "joint bound -ELBO/T (every KL, bounds ln p(X)/T)",
    "memory_conditional": "memory-conditional (KL(M) left out; NOT a bound on ln p(X); the K++/GPM protocol)",
    "heldout": "held-out {n}targets (bounds ln p(x_target | context))",
    "authors": "the authors' score, computed as their code computes its published figure (NOT a bound; "
    "comparable only with that figure)",
    "other": "other metrics",
}
SHORT_NAMES = {
    "joint": "joint",
    "memory_conditional": "mem-cond",
    "heldout": "held-out",
    "authors": "authors'",
    "other": "other",
}
# column-group order: (one-class episodes?, protocol) -> rank
GROUP_RANK = {
    (False, "joint"): 0,
    (False, "memory_conditional"): 1,
    (False, "heldout"): 2,
    (True, "heldout"): 3,
    (True, "joint"): 4,
    (True, "memory_conditional"): 5,
    (False, "authors"): 6,
    (True, "authors"): 7,
    (False, "other"): 8,
    (True, "other"): 9,
}
CORE_PART_RANK = {
    "joint": 3,
    "memory_conditional": 0,
    "heldout": 1,
    "authors": 0,
    "other": -1,
}  # table.md shows ranks <= this


def classify(name: str) -> tuple[str, str, str]:
    """(split, protocol, part) of a metric name, e.g. 'test_class/heldout_kl_z' -> ('test_class',
    'heldout', 'kl_z'); the bound itself is part 'neg_elbo' (joint, heldout) or 'score' (memory_conditional)."""
    split, _, leaf = name.partition("/")
    if leaf == "memory_conditional":
        return split, "memory_conditional", "score"
    if leaf == "heldout" or leaf.startswith("heldout_"):
        return split, "heldout", leaf[len("heldout_") :] or "neg_elbo"
    if leaf == "authors_score":  # a model's published figure as its authors' code computes it (GPM)
        return split, "authors", "score"
    if leaf in ("neg_elbo", "recon", "kl") or leaf.startswith("kl_") or re.fullmatch(r"nll_is\d+", leaf):
        return split, "joint", leaf
    return split, "other", leaf


def split_family(split: str) -> str:
    """'test' for test/ and test_class/ (and any test*/), otherwise the split itself."""
    return "test" if split.startswith("test") else split


def _family_of(metric: str) -> str:
    return split_family(metric.split("/", 1)[0])


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
    if protocol == "authors":
        return "the authors' score (not a bound)" + (", one-class episodes" if is_class_split(split) else "")
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


def _mean_of(rs: list[RunRow], key: str) -> float | None:
    vals = [v for r in rs if (v := getattr(r, key)) is not None]
    return statistics.fmean(vals) if vals else None


def _group_key(row: RunRow, by: tuple[str, ...]) -> tuple:
    """(data, model, T, experiment, *by values, planned budget): runs of one named experiment config (e.g.
    cpu_dkm_mnist and cpu_dkm_sampled_mnist) are never pooled with another's, even where --by does not tell them
    apart, and neither are runs planned for different budgets (trainer.max_epochs / max_steps: 400 and 1,200 steps
    of one config are two points of a budget curve, not one mean)."""
    return (
        str(row.data),
        str(row.model),
        row.episode_length,
        row.experiment or "",
        *(json.dumps(_get(row.config, k), sort_keys=True, default=str) for k in by),
        json.dumps([_get(row.config, "trainer.max_epochs"), _get(row.config, "trainer.max_steps")], default=str),
    )


def _experiment_label(experiment: str, data: str) -> str:
    """'cpu_dkm_sampled_mnist' -> 'cpu_dkm_sampled' (the data set is the table's)."""
    return experiment[: -len(data) - 1] if experiment.endswith(f"_{data}") else experiment


def _labels(rows: list[RunRow], by: tuple[str, ...]) -> dict[tuple, str]:
    """Group key -> legend label: the model, plus T=... when a (data, model) has several episode
    lengths, plus k=v for every --by key, plus the planned budget where one config has several."""
    keys = {_group_key(r, by) for r in rows}
    lengths: dict[tuple, set] = {}
    budgets: dict[tuple, set] = {}
    for k in keys:
        lengths.setdefault(k[:2], set()).add(k[2])
        budgets.setdefault(k[:-1], set()).add(k[-1])
    out = {}
    for k in keys:
        parts = [_experiment_label(k[3], k[0]) if k[3] else k[1]]
        if len(lengths[k[:2]]) > 1:
            parts.append(f"T={k[2]}")
        parts += [f"{b.split('.')[-1]}={json.loads(v)}" for b, v in zip(by, k[4:-1], strict=True)]
        if len(budgets[k[:-1]]) > 1:
            epochs, steps = json.loads(k[-1])
            parts.append(f"{steps} steps" if steps not in (None, -1) else f"{epochs} epochs")
        out[k] = parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
    return out


def _make_group(
    key: tuple, rs: list[RunRow], family: str, by: tuple[str, ...], label: str, unit: str
) -> dict[str, Any]:
    names = sorted({k for r in rs for k in r.metrics if split_family(k.split("/")[0]) == family}, key=_metric_order)
    stats = {name: _stats([r.metrics[name] for r in rs if name in r.metrics]) for name in names}
    return {
        "data": key[0],
        "model": key[1],
        "label": label,
        "episode_length": key[2],
        "by": {b: _get(rs[0].config, b) for b in by},
        "unit": rs[0].unit or unit,
        "is_samples": sorted({r.is_samples for r in rs if r.is_samples is not None}),
        "n": len(rs),
        "seeds": sorted((r.seed for r in rs), key=str),
        "steps": _mean_of(rs, "steps"),
        "checkpoint_step": _mean_of(rs, "checkpoint_step"),
        "train_seconds": _mean_of(rs, "train_seconds"),
        "steps_values": sorted({int(r.steps) for r in rs if r.steps is not None}),
        "heldout_targets": sorted({r.heldout_targets for r in rs if r.heldout_targets is not None}),
        "run_dirs": [r.run_dir for r in rs],
        "metrics": stats,
        "best": False,
        "verdict": "",  # vs the lowest mean of the data set: better | worse | tie (mark_best)
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
        top = next((g for g in cands if g["best"]), None)
        if top is None:
            continue
        for g in cands:
            if g is not top:
                g["verdict"] = "worse" if separated(top["metrics"][metric], g["metrics"][metric]) else "tie"
        others = [g for g in cands if g is not top]
        top["verdict"] = "better" if others and all(g["verdict"] == "worse" for g in others) else "tie"
    return notes


MIN_SEEDS = 3  # the guide's rule: a claim that one model beats another needs at least 3 seeds
SPREAD = 2.0  # ... and a difference beyond their spread: more than 2 pooled seed standard deviations


def separated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two groups' {mean, std, n} of one metric differ beyond their spread: both have >= MIN_SEEDS seeds and
    |mean_a - mean_b| > SPREAD x sqrt((std_a^2 + std_b^2) / 2) (the pooled std of equal-sized groups)."""
    if min(a["n"], b["n"]) < MIN_SEEDS or a["std"] is None or b["std"] is None:
        return False
    return abs(a["mean"] - b["mean"]) > SPREAD * math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)


def aggregate(
    rows: list[RunRow],
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
    failed = [r for r in rows if r.status == "failed"]
    live = [r for r in rows if r.status != "failed"]
    evaluated = [r for r in live if any(split_family(k.split("/", 1)[0]) == family for k in r.metrics)]
    without = [r for r in live if r not in evaluated]
    labels = _labels(live, by)

    units: dict[str, str] = {}
    for r in evaluated:
        if r.unit:
            units.setdefault(str(r.data), r.unit)
    for r in live:
        units.setdefault(str(r.data), UNIT_BY_DATA.get(str(r.data), DEFAULT_UNIT))

    buckets: dict[tuple, list[RunRow]] = {}
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
        "failed": [r.run_dir for r in failed],
        "without_eval": [r.run_dir for r in without],
    }


def aggregate_curves(
    rows: list[RunRow],
    key: str = CURVE_METRIC,
    by: tuple[str, ...] = (),
    labels: dict[tuple, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{data: [{label, model, epochs, mean, std, n}]}: `key` per epoch, mean/std over the group's
    runs that reached that epoch (std None where only one did)."""
    labels = labels or _labels(rows, by)
    per: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        pts = r.curves.get(key) or []
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
