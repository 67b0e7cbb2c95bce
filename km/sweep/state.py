"""Local sweep state: the spec (`load_spec`), state.json (`read_state`, `write_state`, under the flock of
`locked`), a new sweep directory (`start_local`), and W&B's `sweeps` engine on top of it: `suggest` the next
config, `should_stop` (hyperband), `claim_next` / `update_run` (the records agents share). Standard library
only at module level (yaml and sweeps are imported where used)."""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from km.overrides import ConfigError, override_key, split_override

STATE = "state.json"
SPEC = "spec.yaml"
TERMINAL = ("finished", "failed", "stopped")


class SweepError(Exception):
    """Bad sweep input: printed as one `error:` line, exit code 2."""


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
    _check_parameters(p, params)
    return spec


DISTRIBUTION_KEYS = ("value", "values", "min", "max", "distribution", "mu", "sigma", "q", "probabilities")


def _check_distribution(p: Path, key: str, param: Any) -> None:
    """The shape W&B's engine needs, checked at `start` (the agent would crash on it later): a mapping with
    a non-empty `values` list, one `value`, or `min` < `max` (numbers)."""
    if not isinstance(param, dict):
        raise SweepError(
            f"{p}: parameter {key}: give a mapping ({{values: [...]}}, {{value: x}} or {{min: a, max: b}}), "
            f"not a bare {type(param).__name__}"
        )
    unknown = sorted(set(param) - set(DISTRIBUTION_KEYS))
    if unknown:
        raise SweepError(f"{p}: parameter {key}: unknown key '{unknown[0]}'; valid: {', '.join(DISTRIBUTION_KEYS)}")
    if "values" in param and (not isinstance(param["values"], list) or not param["values"]):
        raise SweepError(f"{p}: parameter {key}: 'values' must be a non-empty list")
    if "min" in param or "max" in param:
        lo, hi = param.get("min"), param.get("max")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
            raise SweepError(f"{p}: parameter {key}: min and max must both be numbers")
        if lo >= hi:
            raise SweepError(f"{p}: parameter {key}: min {lo} must be below max {hi}")
    if not ({"values", "value", "min"} & set(param)):
        raise SweepError(f"{p}: parameter {key}: needs values, value or min/max")


def _check_parameters(p: Path, params: dict[str, Any]) -> None:
    for key, param in params.items():  # each becomes `key=value` on a km train command line
        _check_distribution(p, key, param)
        values = param.get("values", [param.get("value")]) if isinstance(param, dict) else [param]
        for v in values if isinstance(values, list) else [values]:
            try:
                split_override(f"{key}={_fmt(v)}")
            except ConfigError as e:
                raise SweepError(f"{p}: parameter {key}: {e}") from None
        if key in ("name", "run_id", "resume"):
            raise SweepError(f"{p}: parameter {key} is reserved: the agent sets name, run_id and resume")


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


def _check_overrides(overrides: list[str], spec: dict[str, Any] | None = None) -> None:
    """`--set KEY=VALUE`: well formed, not reserved, and not a key the spec's parameters set. The one rule:
    a swept or spec-fixed key is the spec's to set; `--set` adds keys the spec leaves alone (refused in one line
    rather than silently overridden by the spec, as it was)."""
    params = (spec or {}).get("parameters") or {}
    for o in overrides:
        if override_key(o) in params:
            raise SweepError(
                f"--set {o}: the spec sets {override_key(o)} under parameters ({params[override_key(o)]}); "
                "change it in the spec, or drop --set"
            )
    for o in overrides:
        try:
            split_override(o)
        except ConfigError as e:
            raise SweepError(f"--set: {e}") from None
        if override_key(o) in ("name", "run_id", "resume"):
            raise SweepError(f"--set {override_key(o)}=... is reserved: the agent sets name, run_id and resume")


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
    for i, r in enumerate(state["runs"]):
        ok = (
            isinstance(r, dict)
            and isinstance(r.get("name"), str)
            and isinstance(r.get("status"), str)
            and isinstance(r.get("config"), dict)
        )
        if not ok:
            raise SweepError(
                f"{p} is damaged: runs[{i}] is not a run record (a mapping with name, status and config); "
                "restore it or start a new sweep"
            )
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


def _check_composes(spec: dict[str, Any], overrides: list[str]) -> None:
    """Every key of the sweep's first point exists (an unknown key or group choice is refused at `start`, in
    one line, instead of failing every run the agent starts)."""
    from km.config import compose_config

    point = []
    for key, param in spec["parameters"].items():
        v = param["values"][0] if "values" in param else param.get("value", param.get("min"))
        point.append(f"{key}={_fmt(v)}")
    try:
        compose_config([*overrides, *point])
    except ConfigError as e:  # a key no run can have; a bad value of one point is that run's failure, recorded
        if str(e).startswith("unknown"):
            raise SweepError(f"the sweep's first point ({' '.join(point)}): {e}") from None


def start_local(spec_path: str | Path, sweep_dir: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Create a local sweep directory (spec.yaml + state.json) and return it."""
    import yaml

    spec = load_spec(spec_path)
    _check_overrides(overrides or [], spec)
    _check_composes(spec, overrides or [])
    d = Path(sweep_dir) if sweep_dir else Path("runs") / "sweeps" / f"{Path(spec_path).stem}-{secrets.token_hex(2)}"
    if d.exists() and not d.is_dir():
        raise SweepError(f"--dir {d} is a file, not a folder")
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


# ----------------------------------------------------------------------------- engine and run records


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
    """Under the lock: pick an `interrupted` run (its trainer was killed by a signal) or an orphaned `running`
    one, else ask the engine; record it as running.

    Returns (record, reason); record None means nothing is left to do (reason says why).
    """
    with locked(sweep_dir):
        state = read_state(sweep_dir)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        rec = next(
            (
                r
                for r in state["runs"]
                if r["status"] == "interrupted" or (r["status"] == "running" and not _pid_alive(r.get("agent")))
            ),
            None,
        )
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
