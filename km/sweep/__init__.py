"""`km sweep`: W&B hyperparameter sweeps, online (W&B server) or offline (local engine).

Specs are standard W&B sweep YAML (see sweeps/*.yaml): `method` grid|random|bayes, `metric`,
`parameters` (dotted config keys, e.g. `model.lr`), optional `early_terminate` (hyperband) and
`run_cap`, and `command: [${env}, km, train, ${args_no_hyphens}]` so every parameter reaches
`km train` as a Hydra `key=value` override.

Offline (no W&B credentials needed; the engine is W&B's own `sweeps` package, so grid, random and
bayes propose exactly what the server would)::

    km sweep start sweeps/km_mnist_lr_memory.yaml --local [--dir D] [--set key=value ...]
        -> creates D (default runs/sweeps/<spec stem>-<4 hex>) with spec.yaml + state.json; prints D
    km sweep agent D [--count N] [--set key=value ...]
        -> loop: sweeps.next_run(spec, previous runs) -> record the run in state.json as `running`
           -> run `python -m km.cli train <suggested overrides> <fixed overrides>
              name=<sweep name> run_id=<run name> resume=auto` as a subprocess
           -> read eval.json (else metrics.csv) for the metric -> record finished|failed|stopped
        until the grid is exhausted, `run_cap` is reached, or N runs were started by this agent.
    km sweep status D [--plot [PNG]]   table: run, config, status, metric (best run marked with *); --plot
                            also draws the metric against each swept parameter (D/sweep.png)

Runs land in <runs_dir>/<sweep name>/<run name>/ (runs_dir: the last `runs_dir=` override given,
else the config default `runs`, relative to the agent's working directory). Each run's stdout and
stderr go to D/logs/<run name>.out / .err. Fixed overrides: `--set` on `start` (saved in state.json,
used by every agent) and on `agent` (this invocation only), then any `key=value` tokens written in
the spec's `command` after `train`. The one rule for `--set`: it adds keys the spec's `parameters` leave
alone; a `--set` of a key the parameters set (swept, or fixed with `value:`) is refused in one line (change
it in the spec). A `key=value` token of the spec's own command that names a parameter is dropped.

state.json (rewritten atomically: temp file + os.replace, under an flock on D/.lock)::

    {"version": 1, "name": "<sweep name>", "spec": "spec.yaml", "created": "<ISO time>",
     "overrides": ["key=value", ...],        # fixed overrides from `start --set`
     "exhausted": false,                      # true once the grid has no point left
     "runs": [{"name": "r001", "config": {"model.lr": 0.001, "seed": 1},   # plain values
               "status": "running|finished|failed|stopped|interrupted", "metric": 123.4 | null,
               "history": [val metric per epoch, ...], "error": null | "<last stderr line>",
               "exit_code": 0, "run_dir": "runs/<sweep>/r001", "attempts": 1,
               "agent": {"pid": 1234, "host": "..."}, "started": "...", "ended": "..."}, ...]}

Fault tolerance:
- finished, failed and stopped runs are never re-run; they are passed to the engine as finished /
  failed runs, so a restarted grid continues where it stopped and bayes keeps its observations.
- a `running` run whose agent is gone (agent killed; its pid is not alive on this host) is re-run
  first, with the SAME run name: `resume=auto` continues it from checkpoints/last.ckpt if an epoch
  was saved, else starts it fresh in the same directory.
- several agents may work on one sweep directory at once (e.g. one per GPU with
  CUDA_VISIBLE_DEVICES): proposing and recording happen under the lock, and a running run whose
  agent is alive is left to it.
- a failed run (non-zero exit: 2 bad config / data, 3 NaN loss, anything else) is recorded with its
  exit code and the last line of its stderr, and the sweep goes on.

Early termination (`early_terminate: {type: hyperband, ...}`): while a run trains, the agent polls
its metrics.csv every few seconds; when a new epoch-level value of the metric appears (the column
`metric.name`, or its `val/` counterpart when the metric is a `test/` one, which has no per-epoch
history) it asks `sweeps.stop_runs` with the histories of all runs of the sweep. If the current run
is named, the agent terminates it (SIGTERM, then SIGKILL) and records it `stopped`, with the best
epoch value as its metric. Granularity: one epoch (plus the poll interval), and only as often as
Lightning flushes metrics.csv.

Online (W&B credentials present and no --local): `km sweep start SPEC [--project P] [--entity E]`
calls `wandb.sweep` and prints the sweep id; `km sweep agent ID [--count N] [--gpus 0,1]` runs one
`wandb agent` subprocess per listed GPU with CUDA_VISIBLE_DEVICES set (one agent without --gpus);
`km` must be on PATH for the spec's command. This path is thin and untested here (no W&B server
in CI): without credentials it stops with a one-line error that points to --local.

The package: `state` (spec, state.json and its lock, the `sweeps` engine, the run records agents share),
`agent` (the local agent: a run as a `km train` subprocess, its outcome, the status table), `online`
(W&B server); this module is the CLI and re-exports their public names. Module-level imports are stdlib
only (plus torch-free km modules): `km sweep start/status` never load torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from km.cli import fail
from km.sweep.agent import (
    POLL_S,
    build_command,
    execute,
    read_history,
    read_metric,
    run_agent,
    status_plot,
    status_table,
    wait_for_trainer,
)
from km.sweep.online import agent_online, start_online
from km.sweep.state import (
    SPEC,
    STATE,
    TERMINAL,
    SweepError,
    claim_next,
    load_spec,
    locked,
    read_state,
    should_stop,
    start_local,
    suggest,
    update_run,
    write_state,
)

__all__ = [
    "POLL_S",
    "SPEC",
    "STATE",
    "TERMINAL",
    "SweepError",
    "add_arguments",
    "agent_online",
    "build_command",
    "claim_next",
    "execute",
    "load_spec",
    "locked",
    "main",
    "read_history",
    "read_metric",
    "read_state",
    "run_agent",
    "should_stop",
    "start_local",
    "start_online",
    "status_plot",
    "status_table",
    "suggest",
    "update_run",
    "wait_for_trainer",
    "write_state",
]

# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sweep_command", required=True)
    s = sub.add_parser("start", help="create a sweep: W&B (online) or a local sweep directory (--local)")
    s.add_argument("spec", help="W&B sweep YAML, e.g. sweeps/km_mnist_lr_memory.yaml")
    s.add_argument("--local", action="store_true", help="offline engine: no W&B server or credentials needed")
    s.add_argument("--dir", default=None, help="sweep directory (default: runs/sweeps/<spec stem>-<id>)")
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed km train override for every run (repeatable; saved in state.json)",
    )
    s.add_argument("--project", default=None, help="W&B project (online; default: the spec's, else kanerva-lab)")
    s.add_argument("--entity", default=None, help="W&B entity (online)")
    a = sub.add_parser("agent", help="run sweep runs: DIR (local sweep) or sweep ID (W&B)")
    a.add_argument("target", help="local sweep directory, or W&B sweep id [entity/project/]id")
    a.add_argument("--count", type=int, default=None, help="start at most N runs in this invocation")
    a.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra fixed km train override for this agent's runs (repeatable)",
    )
    a.add_argument("--gpus", default=None, help="online: comma-separated GPU ids, one `wandb agent` each")
    a.add_argument("--local", action="store_true", help="require a local sweep directory")
    st = sub.add_parser("status", help="table of a local sweep's runs")
    st.add_argument("target", help="local sweep directory")
    st.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="also draw the metric against each swept parameter (default <sweep>/sweep.png)",
    )


def main(args: argparse.Namespace) -> None:
    try:
        if args.sweep_command == "start":
            if args.local:
                print(start_local(args.spec, args.dir, args.overrides))
            else:
                print(start_online(args.spec, args.project, args.entity))
        elif args.sweep_command == "agent":
            target = Path(args.target)
            if (target / STATE).exists():
                summary = run_agent(target, count=args.count, overrides=args.overrides)
                print(f"agent: {summary['started']} run(s) started; {summary['reason']}")
                if summary["failed"]:
                    print(f"agent: {summary['failed']} failed (see km sweep status {target})")
            elif args.local or target.exists() or target.parent.is_dir() and str(target.parent) != ".":
                # a path (its folder exists here): a local sweep that is not there, not a W&B sweep id
                what = "is not a local sweep directory" if target.exists() else "does not exist"
                raise SweepError(f"{target} {what} (no {STATE}); create one with: km sweep start SPEC.yaml --local")
            else:
                raise SystemExit(agent_online(args.target, args.count, args.gpus))
        elif args.sweep_command == "status":
            print(status_table(Path(args.target)))
            if args.plot is not None:
                print(f"plot: {status_plot(Path(args.target), Path(args.plot) if args.plot else None)}")
    except SweepError as e:
        fail(str(e))
