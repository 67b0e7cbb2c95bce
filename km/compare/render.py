"""Rendering: an `aggregate` result as table.md / table.csv / summary.json, the `--doc` block spliced into a
markdown file, and the plots (curves_<data>.png, metric_bars.png). Standard library only at module level
(matplotlib is imported by the plotting functions)."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from km.compare.aggregate import SHORT_NAMES, _family_of, classify, describe, is_class_split, is_core
from km.compare.row import DEFAULT_UNIT, RunRow, _error
from km.runs import atomic_write_text

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
    head = ["data", "model", *by, "unit", "T", "IS", "n", *info, *cols, VERDICT_HEAD]
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
                g.get("verdict") or "-",
            ]
        )
    return "\n".join([*format_legend(agg, cols), "", *_md_table(head, rows, len(info) + len(cols) + 1)]) + "\n"


VERDICT_HEAD = "vs lowest (2 pooled std, n >= 3)"


def _best_line(agg: dict[str, Any]) -> str:
    return (
        f"Bold = best: the lowest {agg['metric']} ({describe(agg['metric'])}) per data set, marked only where "
        "the groups compared trained for the same number of steps (steps trained, from metrics.csv or eval.json). "
        f"Column '{VERDICT_HEAD}': the lowest is 'better' only where its mean is below every other group's by "
        "more than 2 pooled seed std (sqrt((s1^2 + s2^2) / 2)), each group with at least 3 seeds; a group within "
        "that margin of the lowest, or with fewer seeds, is a 'tie'; 'worse' otherwise."
    )


def _doc_header(name: str, unit: str) -> str:
    """Column header for --doc tables: protocol group, quantity, unit, e.g. 'held-out (class) NLL IS20 [nats/image]'."""
    split, protocol, part = classify(name)
    if protocol == "other":
        return f"{name} [{unit}]"
    if protocol == "authors":
        return f"authors' score{' (class)' if is_class_split(split) else ''} [{unit}]"
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
        head = ["model", *agg["by"], "n", "T", "IS", *info, *(_doc_header(c, unit) for c in cols), VERDICT_HEAD]
        rows = [
            [
                f"**{g['label']}**" if g["best"] else g["label"],
                *(str(g["by"].get(b)) for b in agg["by"]),
                str(g["n"]),
                str(g["episode_length"]),
                "/".join(map(str, g["is_samples"])),
                *(_fmt_info(g, h) for h in info),
                *(_cell(g, c, agg["metric"]) for c in cols),
                g.get("verdict") or "-",
            ]
            for g in gs
        ]
        lines += [
            f"**{data}** ({unit}, sorted by {agg['metric']})",
            "",
            *_md_table(head, rows, 3 + len(info) + len(cols) + 1),
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
        "verdict",
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
                g.get("verdict") or "",
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


BUDGET_PANELS = ("test/neg_elbo", "test/memory_conditional", "test/heldout", "test_class/heldout")


def budget_lines(agg: dict[str, Any]) -> dict[str, dict[tuple[str, str], list[dict[str, Any]]]]:
    """data -> (model, training episodes) -> its groups by budget (steps), where some line of the data set has
    groups at two or more budgets (a budget study: the same model trained for 400, 1,200, 3,600 steps)."""
    out: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for g in agg["groups"]:
        if len(g["steps_values"]) != 1:
            continue  # a group of mixed budgets is no point of a budget curve
        key = (g["model"], str(g["by"].get("data.episodes", "iid")))
        out.setdefault(g["data"], {}).setdefault(key, []).append(g)
    return {
        d: {k: sorted(v, key=lambda g: g["steps_values"][0]) for k, v in lines.items()}
        for d, lines in out.items()
        if any(len({g["steps_values"][0] for g in v}) > 1 for v in lines.values())
    }


def plot_budgets(agg: dict[str, Any], out: Path) -> list[Path]:
    """budget_<data>.png: one panel per protocol (joint, memory-conditional, held-out on iid and on one-class
    episodes), nats (or bits) against optimiser steps on a log axis, a line per (model, training episodes),
    error bars = sample std over seeds, n per point in the legend. Only data sets with a budget study."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    paths = []
    for data, lines in sorted(budget_lines(agg).items()):
        unit = agg["units"].get(data, DEFAULT_UNIT)
        fig = Figure(figsize=(13, 4.6), dpi=110, layout="constrained")
        axes = fig.subplots(1, len(BUDGET_PANELS))
        budgets = sorted({g["steps_values"][0] for gs in lines.values() for g in gs})
        for ax, metric in zip(axes, BUDGET_PANELS, strict=True):
            for i, ((model, episodes), gs) in enumerate(sorted(lines.items())):
                pts = [(g["steps_values"][0], g["metrics"][metric], g["n"]) for g in gs if metric in g["metrics"]]
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [p[1]["mean"] for p in pts]
                es = [p[1]["std"] or 0.0 for p in pts]
                ns = "/".join(str(p[2]) for p in pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=f"C{i % 10}",
                            label=f"{model}, {episodes} (n={ns})")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xticks(budgets, [f"{b:,.0f}" for b in budgets], fontsize=8)  # the budgets trained, no crowding
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("optimiser steps (log)")
            ax.set_title(textwrap.fill(f"{metric}: {describe(metric)}", 42), fontsize=8)
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel(f"{unit} (mean ± std over seeds)")
        handles, labels = axes[0].get_legend_handles_labels()  # below the panels: over one it hides its points
        fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)), fontsize=7,
                   title="model, training episodes (n = seeds per budget)", title_fontsize=7)  # fmt: skip
        fig.suptitle(f"{data}: the protocols against the training budget", fontsize=10)
        p = out / f"budget_{_safe(data)}.png"
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
    ticks = {id(g): textwrap.fill(g["label"], 18) + f"\nn={g['n']}" for gs in per.values() for g in gs}
    # a bar's share of the width fits its wrapped label (about 0.075 inch a character at fontsize 8): no overlap
    bar_in = max(0.9, 0.075 * max(len(line) for t in ticks.values() for line in t.splitlines()) + 0.15)
    widths = [max(2.2, bar_in * len(per[d]) + 1.2) for d in datas]
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
        ax.set_xticks(xs, [ticks[id(g)] for g in gs], fontsize=8)
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


def write_outputs(agg: dict[str, Any], rows: list[RunRow], out: Path) -> dict[str, Any]:
    """Write table.md, table.csv, curves_<data>.png, metric_bars.png, summary.json into `out`.

    Every file is first written whole into a staging folder inside `out` and only then renamed into place, so a
    kill or a full disk never leaves a 0-byte or half-written report beside the previous one: either the new
    file or the old one is there. A failure to write removes the staging folder and is one line."""
    import shutil

    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".compare-tmp-", dir=out))
    except OSError as e:
        raise _error(f"cannot write the report into {out}: {e.strerror or e}") from None
    try:
        res = _write_outputs(agg, rows, stage)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    except OSError as e:
        raise _error(
            f"cannot write the report into {out}: {e.strerror or e}; the files there before are untouched"
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    here = {k: (out / v.name if isinstance(v, Path) else v) for k, v in res.items()}
    here["curves"] = [out / c.name for c in res["curves"]]
    here["budgets"] = [out / c.name for c in res["budgets"]]
    here["bars"] = out / res["bars"].name if res["bars"] else None
    return here


def _write_outputs(agg: dict[str, Any], rows: list[RunRow], out: Path) -> dict[str, Any]:
    md = format_markdown(agg)
    notes = _notes(agg)
    title = f"# {agg['metric']}: {describe(agg['metric'])} (mean ± std over seeds, sample std; '-' = one run)"
    (out / "table.md").write_text(
        f"{title}\n\n{_best_line(agg)}\n\n" + md + ("\n" + "\n".join(notes) + "\n" if notes else "")
    )
    write_csv(agg, out / "table.csv")
    curves = plot_curves(agg, out)
    budgets = plot_budgets(agg, out)
    bars = plot_bars(agg, out)
    run_rows = [{k: v for k, v in r.as_dict().items() if k not in ("config", "curves")} for r in rows]
    summary = {**agg, "notes": notes, "run_rows": run_rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {
        "table_md": out / "table.md",
        "table_csv": out / "table.csv",
        "curves": curves,
        "budgets": budgets,
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
