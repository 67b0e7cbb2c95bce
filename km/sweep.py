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
    km sweep status D       table: run, config, status, metric (best run marked with *)

Runs land in <runs_dir>/<sweep name>/<run name>/ (runs_dir: the last `runs_dir=` override given,
else the config default `runs`, relative to the agent's working directory). Each run's stdout and
stderr go to D/logs/<run name>.out / .err. Fixed overrides: `--set` on `start` (saved in state.json,
used by every agent) and on `agent` (this invocation only), then any `key=value` tokens written in
the spec's `command` after `train`. Where a fixed override names a swept parameter, the sweep's
value wins (the fixed one is dropped).

state.json (rewritten atomically: temp file + os.replace, under an flock on D/.lock)::

    {"version": 1, "name": "<sweep name>", "spec": "spec.yaml", "created": "<ISO time>",
     "overrides": ["key=value", ...],        # fixed overrides from `start --set`
     "exhausted": false,                      # true once the grid has no point left
     "runs": [{"name": "r001", "config": {"model.lr": 0.001, "seed": 1},   # plain values
               "status": "running|finished|failed|stopped", "metric": 123.4 | null,
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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from km import wandb_env
from km.overrides import ConfigError, override_key, split_override

STATE = "state.json"
SPEC = "spec.yaml"
POLL_S = 2.0
TERMINAL = ("finished", "failed", "stopped")


class SweepError(Exception):
    """Bad sweep input: printed as one `error:` line, exit code 2."""


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
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- spec and state


def load_spec(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SweepError(f"no such sweep spec: {p}")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{p}: a sweep spec must be a mapping")
    if spec.get("method") not in ("grid", "random", "bayes"):
        raise SweepError(f"{p}: method must be grid, random or bayes (got {spec.get('method')!r})")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{p}: 'parameters' must be a non-empty mapping")
    if spec["method"] == "bayes" and not (spec.get("metric") or {}).get("name"):
        raise SweepError(f"{p}: bayes needs 'metric: {{name: ..., goal: minimize|maximize}}'")
    et = spec.get("early_terminate")
    if et is not None and (not isinstance(et, dict) or et.get("type") != "hyperband"):
        raise SweepError(f"{p}: early_terminate supports only type: hyperband")
    for key, param in params.items():  # each becomes `key=value` on a km train command line
        values = param.get("values", [param.get("value")]) if isinstance(param, dict) else [param]
        for v in values if isinstance(values, list) else [values]:
            try:
                split_override(f"{key}={_fmt(v)}")
            except ConfigError as e:
                raise SweepError(f"{p}: parameter {key}: {e}") from None
        if key in ("name", "run_id", "resume"):
            raise SweepError(f"{p}: parameter {key} is reserved: the agent sets name, run_id and resume")
    return spec


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def read_state(sweep_dir: Path) -> dict[str, Any]:
    p = Path(sweep_dir) / STATE
    if not p.exists():
        raise SweepError(f"{sweep_dir} is not a local sweep directory (no {STATE})")
    try:
        state = json.loads(p.read_text())
    except (ValueError, OSError) as e:  # written atomically by us, so only outside damage truncates it
        raise SweepError(
            f"{p} is unreadable ({type(e).__name__}: {str(e)[:80]}); restore it from a backup, or "
            "start a new sweep (finished runs keep their run directories)"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("runs"), list):
        raise SweepError(f"{p} is not a sweep state (no 'runs' list); restore it or start a new sweep")
    return state


def write_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    from km.runs import atomic_write_text

    atomic_write_text(Path(sweep_dir) / STATE, json.dumps(state, indent=2))


@contextmanager
def locked(sweep_dir: Path) -> Iterator[None]:
    import fcntl

    with open(Path(sweep_dir) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_local(spec_path: str | Path, sweep_dir: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Create a local sweep directory (spec.yaml + state.json) and return it."""
    import yaml

    spec = load_spec(spec_path)
    _check_overrides(overrides or [])
    d = Path(sweep_dir) if sweep_dir else Path("runs") / "sweeps" / f"{Path(spec_path).stem}-{secrets.token_hex(2)}"
    if (d / STATE).exists():
        raise SweepError(f"{d} already holds a sweep; continue it with: km sweep agent {d}")
    d.mkdir(parents=True, exist_ok=True)
    (d / SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    write_state(
        d,
        {
            "version": 1,
            "name": d.name,
            "spec": SPEC,
            "created": _now(),
            "overrides": list(overrides or []),
            "exhausted": False,
            "runs": [],
        },
    )
    return d


# ----------------------------------------------------------------------------- engine


def _plain(v: Any) -> Any:
    """numpy scalars / containers -> JSON-native values."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def _import_sweeps():
    import warnings

    with warnings.catch_warnings():  # pydantic v2 warns about the package's v1-style Config
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def _metric_of(spec: dict[str, Any]) -> tuple[str | None, str]:
    m = spec.get("metric") or {}
    return m.get("name"), m.get("goal", "minimize")


def _sweep_run(rec: dict[str, Any], spec: dict[str, Any], as_running: bool = False):
    """A state.json run record -> sweeps.SweepRun for the engine."""
    sweeps = _import_sweeps()
    name, _ = _metric_of(spec)
    state = {"finished": "finished", "stopped": "finished", "failed": "failed"}.get(rec["status"], "running")
    if as_running:
        state = "running"
    summary = {name: rec["metric"]} if name and rec.get("metric") is not None else {}
    hist_key = _history_key(spec)
    history = [{hist_key: v} for v in rec.get("history") or []] if hist_key else []
    return sweeps.SweepRun(
        name=rec["name"],
        state=sweeps.RunState(state),
        config={k: {"value": v} for k, v in rec["config"].items()},
        summary_metrics=summary,
        history=history,
    )


def suggest(spec: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The engine's next config as plain {param: value}, or None when the search space is exhausted."""
    sweeps = _import_sweeps()
    runs = [_sweep_run(r, spec) for r in records]
    try:
        nxt = sweeps.next_run(spec, runs)
    except ValueError as e:
        raise SweepError(f"sweep engine: {e}") from None
    if nxt is None:
        return None
    return {k: _plain(v["value"]) for k, v in nxt.config.items()}


def _history_key(spec: dict[str, Any]) -> str | None:
    name, _ = _metric_of(spec)
    if not name:
        return None
    return "val/" + name.split("/", 1)[1] if name.startswith("test/") else name


def should_stop(spec: dict[str, Any], records: list[dict[str, Any]], current: str) -> bool:
    """Hyperband: does the engine say to stop run `current` (state `running`) now?"""
    if not spec.get("early_terminate"):
        return False
    sweeps = _import_sweeps()
    runs = [
        _sweep_run(r, spec, as_running=(r["name"] == current))
        for r in records
        if r["status"] in TERMINAL or r["name"] == current
    ]
    # the engine reads histories under metric.name: give it the per-epoch key (val/ for a test/ metric)
    et_spec = {**spec, "metric": {**(spec.get("metric") or {}), "name": _history_key(spec)}}
    try:
        return any(r.name == current for r in sweeps.stop_runs(et_spec, runs))
    except ValueError as e:
        print(f"[sweep] early termination disabled: {e}", file=sys.stderr)
        spec["early_terminate"] = None
        return False


def _pid_alive(agent: dict[str, Any] | None) -> bool:
    if not agent or agent.get("host") != socket.gethostname():
        return False  # an agent on another host cannot be checked: its running run is taken over
    try:
        os.kill(int(agent["pid"]), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) counts as gone
    try:
        return Path(f"/proc/{agent['pid']}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def claim_next(sweep_dir: Path, spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Under the lock: pick an orphaned `running` run, else ask the engine; record it as running.

    Returns (record, reason); record None means nothing is left to do (reason says why).
    """
    with locked(sweep_dir):
        state = read_state(sweep_dir)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        rec = next((r for r in state["runs"] if r["status"] == "running" and not _pid_alive(r.get("agent"))), None)
        if rec is None:
            cap = spec.get("run_cap")
            if state.get("exhausted"):
                return None, "the grid is exhausted"
            if cap is not None and len(state["runs"]) >= int(cap):
                return None, f"run_cap {cap} reached"
            config = suggest(spec, state["runs"])
            if config is None:
                state["exhausted"] = True
                write_state(sweep_dir, state)
                return None, "the grid is exhausted"
            rec = {
                "name": f"r{len(state['runs']) + 1:03d}",
                "config": config,
                "status": "running",
                "metric": None,
                "history": [],
                "error": None,
                "exit_code": None,
                "run_dir": None,
                "attempts": 0,
                "agent": me,
                "started": None,
                "ended": None,
            }
            state["runs"].append(rec)
        rec.update(agent=me, attempts=rec.get("attempts", 0) + 1, started=_now(), ended=None, status="running")
        write_state(sweep_dir, state)
        return dict(rec), "claimed"


def update_run(sweep_dir: Path, name: str, **fields: Any) -> None:
    with locked(sweep_dir):
        state = read_state(sweep_dir)
        for r in state["runs"]:
            if r["name"] == name:
                r.update(fields)
        write_state(sweep_dir, state)


# ----------------------------------------------------------------------------- running one run


def _fmt(v: Any) -> str:
    """A plain value -> Hydra override text."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        try:
            split_override(o)
        except ConfigError as e:
            raise SweepError(f"--set: {e}") from None
        if override_key(o) in ("name", "run_id", "resume"):
            raise SweepError(f"--set {override_key(o)}=... is reserved: the agent sets name, run_id and resume")


def _spec_command_overrides(spec: dict[str, Any]) -> list[str]:
    """`key=value` tokens written in the spec's command after `train` (macros and flags skipped)."""
    cmd = [str(c) for c in spec.get("command") or []]
    if "train" not in cmd:
        return []
    return [c for c in cmd[cmd.index("train") + 1 :] if "=" in c and not c.startswith("${")]


def build_command(spec: dict[str, Any], state: dict[str, Any], rec: dict[str, Any], extra: list[str]) -> list[str]:
    swept = set(rec["config"])
    fixed: dict[str, str] = {}  # a key given twice: the later one wins
    for o in [*_spec_command_overrides(spec), *state.get("overrides", []), *extra]:
        if override_key(o) not in swept:
            fixed.pop(override_key(o), None)
            fixed[override_key(o)] = o
    params = [f"{k}={_fmt(v)}" for k, v in rec["config"].items()]
    return [
        sys.executable,
        "-m",
        "km.cli",
        "train",
        *params,
        *fixed.values(),
        f"name={state['name']}",
        f"run_id={rec['name']}",
        "resume=auto",
    ]


def _run_dir(cmd: list[str], sweep_name: str, run_name: str) -> Path:
    runs_dir = "runs"
    for o in cmd:
        if override_key(o) == "runs_dir" and "=" in o:
            runs_dir = o.split("=", 1)[1]
    return Path(runs_dir) / sweep_name / run_name


def read_history(run_dir: Path, key: str | None) -> list[float]:
    """Epoch-level values of `key` from metrics.csv, in epoch order (last value per epoch)."""
    from km.runs import epoch_metrics

    out = epoch_metrics(run_dir, key) if key else {}
    return [out[e] for e in sorted(out)]


def read_metric(run_dir: Path, spec: dict[str, Any]) -> float | None:
    """eval.json's metrics[name] if there, else the best epoch value of `name` in metrics.csv."""
    name, goal = _metric_of(spec)
    if not name:
        return None
    from km.runs import read_json

    v = ((read_json(run_dir / "eval.json") or {}).get("metrics") or {}).get(name)
    if isinstance(v, (int, float)):
        return float(v)
    hist = read_history(run_dir, name)
    if hist:
        return max(hist) if goal == "maximize" else min(hist)
    return None


def _last_line(path: Path, offset: int) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1][:500] if lines else None


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def execute(sweep_dir: Path, spec: dict[str, Any], rec: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Run one claimed run as a `km train` subprocess; record and return its outcome."""
    state = read_state(sweep_dir)
    cmd = build_command(spec, state, rec, extra)
    run_dir = _run_dir(cmd, state["name"], rec["name"])
    logs = sweep_dir / "logs"
    logs.mkdir(exist_ok=True)
    out_p, err_p = logs / f"{rec['name']}.out", logs / f"{rec['name']}.err"
    err_offset = err_p.stat().st_size if err_p.exists() else 0
    update_run(sweep_dir, rec["name"], run_dir=str(run_dir))
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in rec["config"].items())
    again = f" (attempt {rec['attempts']}, resume=auto)" if rec.get("attempts", 1) > 1 else ""
    print(f"[sweep] {rec['name']} start{again}: {shown}  (log: {logs}/{rec['name']}.out/.err)", flush=True)
    if wait_for_trainer(run_dir, rec["name"]) and _finished(run_dir):  # the orphan finished the run itself
        return _record_outcome(
            sweep_dir,
            spec,
            rec,
            run_dir,
            0,
            err_p,
            err_offset,
            stopped=False,
            note="finished by the trainer of an earlier agent",
        )
    hist_key = _history_key(spec)
    stopped = False
    with open(out_p, "ab") as out, open(err_p, "ab") as err:
        # own process group: _stop() ends the trainer and any DDP workers it spawned together
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            seen = 0
            while proc.poll() is None:
                time.sleep(POLL_S if spec.get("early_terminate") else 0.2)
                if not spec.get("early_terminate"):
                    continue
                hist = read_history(run_dir, hist_key)
                if len(hist) > seen:
                    seen = len(hist)
                    records = read_state(sweep_dir)["runs"]
                    for r in records:
                        if r["name"] == rec["name"]:
                            r["history"] = hist
                    update_run(sweep_dir, rec["name"], history=hist)
                    if should_stop(spec, records, rec["name"]):
                        print(f"[sweep] {rec['name']}: hyperband stops it after epoch {seen}", flush=True)
                        _stop(proc)
                        stopped = True
        except BaseException:
            _stop(proc, grace=10.0)  # agent interrupted: leave the run `running` so a restart resumes it
            raise
    return _record_outcome(sweep_dir, spec, rec, run_dir, proc.returncode, err_p, err_offset, stopped)


def wait_for_trainer(run_dir: Path, name: str, poll: float = 2.0) -> bool:
    """Block while another process holds `run_dir`'s lock (the trainer of an agent that was killed: it runs in
    its own session and outlives its agent). Returns True if it had to wait."""
    from km.runs import lock_holder

    holder = lock_holder(run_dir)
    if holder is None:
        return False
    print(
        f"[sweep] {name}: waiting for the trainer still running it (pid {holder}, left by an earlier agent)", flush=True
    )
    while lock_holder(run_dir) is not None:
        time.sleep(poll)
    return True


def _finished(run_dir: Path) -> bool:
    from km.runs import read_meta

    return read_meta(run_dir).get("status") == "finished" and (run_dir / "eval.json").exists()


def _record_outcome(
    sweep_dir: Path,
    spec: dict[str, Any],
    rec: dict[str, Any],
    run_dir: Path,
    code: int,
    err_p: Path,
    err_offset: int,
    stopped: bool,
    note: str | None = None,
) -> dict[str, Any]:
    hist_key = _history_key(spec)
    history = read_history(run_dir, hist_key)
    metric = read_metric(run_dir, spec)
    if stopped:
        status, error = "stopped", None
        name, goal = _metric_of(spec)
        if metric is None and history and name == hist_key:
            metric = max(history) if goal == "maximize" else min(history)
    elif code == 0:
        status, error = "finished", None
    else:
        status, error = "failed", _last_line(err_p, err_offset) or f"exit code {code}"
    fields = {
        "status": status,
        "exit_code": code,
        "metric": metric,
        "history": history,
        "error": error,
        "ended": _now(),
    }
    update_run(sweep_dir, rec["name"], **fields)
    mname = _metric_of(spec)[0] or "metric"
    tail = f"{mname} {metric:.4f}" if metric is not None else ""
    print(
        f"[sweep] {rec['name']} {status} (exit {code}) {tail}"
        + (f" error: {error}" if error else "")
        + (f" ({note})" if note else ""),
        flush=True,
    )
    return {**rec, **fields}


def run_agent(sweep_dir: str | Path, count: int | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the local sweep in `sweep_dir` until done or `count` runs were started here."""
    import yaml

    d = Path(sweep_dir)
    state = read_state(d)
    spec = yaml.safe_load((d / state.get("spec", SPEC)).read_text())
    extra = list(overrides or [])
    _check_overrides(extra)
    started = failed = 0
    reason = f"--count {count} reached"
    while count is None or started < count:
        rec, why = claim_next(d, spec)
        if rec is None:
            reason = why
            break
        started += 1
        if execute(d, spec, rec, extra)["status"] == "failed":
            failed += 1
    return {"started": started, "failed": failed, "reason": reason}


def status_table(sweep_dir: Path) -> str:
    import yaml

    state = read_state(sweep_dir)
    spec = yaml.safe_load((Path(sweep_dir) / state.get("spec", SPEC)).read_text())
    name, goal = _metric_of(spec)
    runs = state["runs"]
    done = [r for r in runs if r.get("metric") is not None and r["status"] in ("finished", "stopped")]
    best = (max if goal == "maximize" else min)(done, key=lambda r: r["metric"])["name"] if done else None
    # only the parameters that differ between runs, by their shortest unambiguous name; errors cut to 70 chars,
    # so a row fits a terminal (the full record: state.json and logs/<run>.err)
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    varying = [k for k in keys if len({_fmt(r["config"].get(k)) for r in runs}) > 1] or keys
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    if len(set(short.values())) < len(short):
        short = {k: k for k in varying}
    fixed = {k: _fmt(runs[0]["config"].get(k)) for k in keys if k not in varying}
    rows = [("run", "config", "status", name or "metric", "note")]
    for r in runs:
        cfg = " ".join(f"{short[k]}={_fmt(r['config'].get(k))}" for k in varying)
        m = f"{r['metric']:.4f}" if r.get("metric") is not None else "-"
        err = r.get("error") or ""
        note = ("* best" if r["name"] == best else "") + (f" {err[:70]}{'...' if len(err) > 70 else ''}" if err else "")
        rows.append((r["name"], cfg, r["status"], m, note.strip()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"sweep {state['name']} ({spec.get('method')}, {goal} {name}): {len(runs)} run(s)"
        + (", grid exhausted" if state.get("exhausted") else "")
    ]
    if fixed:
        lines.append("same in every run: " + " ".join(f"{k}={v}" for k, v in fixed.items()))
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + (f"  {row[4]}" if row[4] else "")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- online (W&B server)


def _need_credentials(what: str) -> None:
    if not wandb_env.online_possible():
        raise SweepError(
            f"{what} needs W&B credentials (WANDB_API_KEY or `wandb login`; WANDB_MODE must not be "
            "offline); without them use the local engine: km sweep start SPEC.yaml --local, "
            "then km sweep agent <dir>"
        )


def start_online(spec_path: str, project: str | None, entity: str | None) -> str:
    spec = load_spec(spec_path)
    _need_credentials("km sweep start")
    import wandb

    sweep_id = wandb.sweep(
        spec, project=project or spec.get("project") or "kanerva-lab", entity=entity or spec.get("entity")
    )
    return str(sweep_id)


def agent_online(sweep_id: str, count: int | None, gpus: str | None) -> int:
    """One `wandb agent` per GPU (CUDA_VISIBLE_DEVICES set), or one without --gpus; waits for all."""
    _need_credentials("km sweep agent (online)")
    cmd = [sys.executable, "-m", "wandb", "agent", *(["--count", str(count)] if count else []), sweep_id]
    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else [None]
    procs = []
    for dev in devices:
        env = dict(os.environ)
        if dev is not None:
            env["CUDA_VISIBLE_DEVICES"] = dev
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        return max(p.wait() for p in procs)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        return 130
