"""The local agent: claim a run, run it as a `km train` subprocess (`build_command`, `execute`, stopping it
where hyperband says so), record its outcome in state.json (`run_agent`), and the status table. Standard
library only at module level."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from km.overrides import override_key
from km.sweep.state import (
    SPEC,
    SweepError,
    _check_overrides,
    _fmt,
    _history_key,
    _metric_of,
    _now,
    claim_next,
    read_state,
    should_stop,
    update_run,
)

POLL_S = 2.0


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


INTERRUPTED_CODES = (130, 143)  # km train's exit after SIGINT / SIGTERM (km.runs.RunInterrupted)
MAX_INTERRUPTED = 3  # attempts of one point ended by a signal before it counts as failed


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
    elif (code < 0 or code in INTERRUPTED_CODES) and rec.get("attempts", 1) < MAX_INTERRUPTED:
        # killed by a signal (SIGTERM from a scheduler, an OOM reaper's SIGKILL): the run keeps its checkpoint
        # and the next claim trains it again from there (resume=auto); after MAX_INTERRUPTED tries it fails
        status, error = "interrupted", _last_line(err_p, err_offset) or f"killed by signal {-code}"
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
    _check_overrides(extra, spec)
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


def status_plot(sweep_dir: Path, path: Path | None = None) -> Path:
    """metric against each hyperparameter that differs between the sweep's runs, one panel each (a log axis
    where a numeric parameter spans more than 10x, categories for strings); every run with a metric is a
    point (finished: filled, stopped early: hollow), the best run ringed. -> <sweep>/sweep.png by default.
    The title and the axis labels are also stored as the PNG's Title and Description text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    state = read_state(sweep_dir)
    spec = yaml.safe_load((Path(sweep_dir) / state.get("spec", SPEC)).read_text())
    name, goal = _metric_of(spec)
    runs = [r for r in state["runs"] if r.get("metric") is not None and r["status"] in ("finished", "stopped")]
    if not runs:
        raise SweepError(f"{sweep_dir}: no run has a metric yet, nothing to plot (km sweep status {sweep_dir})")
    keys = list(dict.fromkeys(k for r in state["runs"] for k in r["config"]))
    varying = [k for k in keys if len({_fmt(r["config"].get(k)) for r in runs}) > 1] or keys[:1]
    best = (max if goal == "maximize" else min)(runs, key=lambda r: r["metric"])
    fig, axes = plt.subplots(1, len(varying), figsize=(4.2 * len(varying), 3.6), squeeze=False)
    labels = []
    for ax, k in zip(axes[0], varying, strict=True):
        vals = [r["config"].get(k) for r in runs]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)
        if numeric:
            xs = [float(v) for v in vals]
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        else:
            cats = sorted({_fmt(v) for v in vals})
            xs = [cats.index(_fmt(v)) for v in vals]
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=8)
        for x, r in zip(xs, runs, strict=True):
            filled = r["status"] == "finished"
            ax.plot(x, r["metric"], "o", color="C0", mfc="C0" if filled else "none", ms=6)
            if r is best:
                ax.plot(x, r["metric"], "o", mfc="none", mec="C3", ms=13, mew=1.5, label=f"best: {r['name']}")
        ax.set(xlabel=k, ylabel=name or "metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        labels.append(f"x: {k}, y: {name or 'metric'}")
    title = (
        f"sweep {state['name']}: {name or 'metric'} ({goal}) against each swept parameter; "
        f"{len(runs)} run(s) with a metric, hollow = stopped early"
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path) if path else Path(sweep_dir) / "sweep.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Title": title, "Description": "\n".join(labels)})
    plt.close(fig)
    return out
