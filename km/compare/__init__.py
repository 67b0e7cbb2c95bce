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

The package: `row` (RunRow, the typed row of one run), `collect` (finding run directories, reading
them or W&B into rows), `aggregate` (protocol groups, column order, seeds pooled per group), `render`
(table.md / table.csv / summary.json, the --doc block, the plots); this module is the CLI and re-exports
their public names. Module-level imports are stdlib only: the CLI imports this package on every command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from km.compare.aggregate import (
    CORE_PART_RANK,
    GROUP_RANK,
    PROTOCOL_TITLES,
    SHORT_NAMES,
    _family_of,
    aggregate,
    aggregate_curves,
    classify,
    column_groups,
    describe,
    episode_kind,
    is_class_split,
    is_core,
    mark_best,
    split_family,
)
from km.compare.collect import SKIP_DIRS, collect, collect_wandb, discover, is_sweep_dir, read_curves, read_run
from km.compare.render import (
    DOC_BEGIN,
    DOC_END,
    bar_label,
    format_doc_block,
    format_doc_tables,
    format_doc_terms,
    format_legend,
    format_markdown,
    plot_bars,
    plot_curves,
    splice_doc,
    term_columns,
    write_csv,
    write_doc,
    write_outputs,
)
from km.compare.row import CURVE_METRIC, DEFAULT_UNIT, MAIN_METRIC, UNIT_BY_DATA, RunRow, _error

__all__ = [
    "CORE_PART_RANK",
    "CURVE_METRIC",
    "DEFAULT_UNIT",
    "DOC_BEGIN",
    "DOC_END",
    "GROUP_RANK",
    "MAIN_METRIC",
    "PROTOCOL_TITLES",
    "SHORT_NAMES",
    "SKIP_DIRS",
    "UNIT_BY_DATA",
    "RunRow",
    "add_arguments",
    "aggregate",
    "aggregate_curves",
    "bar_label",
    "classify",
    "collect",
    "collect_wandb",
    "column_groups",
    "command_line",
    "default_out",
    "describe",
    "discover",
    "episode_kind",
    "format_doc_block",
    "format_doc_tables",
    "format_doc_terms",
    "format_legend",
    "format_markdown",
    "is_class_split",
    "is_core",
    "is_sweep_dir",
    "main",
    "mark_best",
    "plot_bars",
    "plot_curves",
    "read_curves",
    "read_run",
    "splice_doc",
    "split_family",
    "term_columns",
    "write_csv",
    "write_doc",
    "write_outputs",
]


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
        + " ".join(p.name for p in [*res["curves"], *res["budgets"], *([res["bars"]] if res["bars"] else [])])
    )
    if doc:
        print(f"wrote {doc}: tables between '{DOC_BEGIN}' and '{DOC_END}'")
    sys.stdout.flush()
