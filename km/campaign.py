"""`km campaign FILE`: train a list of experiments to their full budgets on one GPU, several processes at once,
in time slices that each end inside `--budget-s`, exactly resumable from one slice to the next.

A campaign file (YAML; campaigns/*.yaml):

    name: paper_omniglot               # the campaign folder: runs/campaigns/<name> (or --dir)
    procs: 2                           # trainers at once (or `auto`: measure 1, 2 and 4, keep the fastest)
    overrides: [trainer.compile=true]  # given to every experiment
    experiments:                       # trained in this order, `procs` at a time
      - paper_vae_omniglot
      - {experiment: paper_km_omniglot, overrides: [seed=2], name: paper_km_omniglot_s2}

How a slice works, and why nothing is lost:
- Each experiment is one run, `<dir>/runs/<name>/campaign`, trained by a `km train ... resume=auto`
  subprocess: a fresh run the first time, a continuation from its `last.ckpt` afterwards (the platform's exact
  resume). Its output goes to `<dir>/logs/<name>.log`; the campaign prints its latest progress line (epoch,
  steps/s, ETA of the whole run) every `--progress-s`.
- Every trainer is given the slice's deadline (`KM_STOP_AT`, km/callbacks.py `StopAt`): it stops at the last
  epoch end that fits, with that epoch's checkpoint written, and marks itself `paused` in run.json. A trainer
  that is still busy at the deadline (a long evaluation) is killed: it loses at most the epoch or the
  evaluation in progress and is resumed from its last checkpoint by the next slice, like any killed run.
- A finished run (run.json `finished` and eval.json written) is never started again; a killed campaign (the
  whole process group, SIGKILL included) is simply run again. A run that failed is retried once per campaign
  invocation, at most `MAX_ATTEMPTS` times over all slices, then reported with its error.
- Each finished run is evaluated by its trainer under the three protocols with its config's importance-sample
  count (the paper configs: 1000), so eval.json is the run's final table row.
- The final table (`<dir>/table.md`, also printed) lists every experiment: status, epochs, steps, wall seconds
  over all slices, and its joint, memory-conditional and held-out test numbers.

`--smoke` runs the same code path at tiny sizes on the CPU (`SMOKE_SIZES`, `SMOKE_FORCED`): what the test suite runs.
Standard library and yaml only at module level; torch is imported to look for a CUDA device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_ID = "campaign"
MAX_ATTEMPTS = 3  # failed attempts of one run, over all slices, before the campaign stops retrying it
PROBE_PROCS = (1, 2, 4)

# --smoke: the paper experiments at sizes that train in seconds on one CPU thread (the suite's tiny runs).
# SMOKE_FORCED comes last; SMOKE_SIZES before the campaign's own overrides, which may change them.
SMOKE_FORCED = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "trainer.num_threads=1",
    "trainer.compile=false",  # inductor takes ~33 s per model and process on these CPUs
    "logger=csv",
]
SMOKE_SIZES = [
    "trainer.max_epochs=3",
    "trainer.num_sanity_val_steps=0",
    "data.episode_length=8",
    "data.batch_size=4",
    "data.train_episodes_per_epoch=16",
    "data.val_episodes=4",
    "data.test_episodes=4",
    "net.channels=[4,4,4]",
    "net.embed_dim=16",
    "model.code_dim=8",
    "eval.is_samples=2",
    "eval.class_episodes=false",
]


class CampaignError(Exception):
    """Bad input to a campaign: one line, exit 2 (km.cli)."""


@dataclass
class Entry:
    name: str  # the run's name: runs/<name>/campaign
    experiment: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Campaign:
    name: str
    entries: list[Entry]
    procs: int | str = 2
    overrides: list[str] = field(default_factory=list)


# ---- the file ---------------------------------------------------------------------------------------------


def _experiment_names() -> list[str]:
    from km.config import config_dir

    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def _str_list(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(o, str | int | float) for o in v):
        raise CampaignError(f"{where}: overrides must be a list of KEY=VALUE strings")
    return [str(o) for o in v]


def load_campaign(path: str | Path) -> Campaign:
    """Read and check a campaign file: every experiment must exist and every name be unique (one line each)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CampaignError(f"no such campaign file: {p}")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CampaignError(f"{p} is not valid YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("experiments"), list) or not spec["experiments"]:
        raise CampaignError(f"{p}: needs a non-empty 'experiments' list")
    unknown = set(spec) - {"name", "procs", "overrides", "experiments"}
    if unknown:
        raise CampaignError(f"{p}: unknown key '{sorted(unknown)[0]}'; valid: name, procs, overrides, experiments")
    known = _experiment_names()
    entries: list[Entry] = []
    for i, e in enumerate(spec["experiments"]):
        if isinstance(e, str):
            e = {"experiment": e}
        if not isinstance(e, dict) or not isinstance(e.get("experiment"), str):
            raise CampaignError(f"{p}: experiments[{i}] must be a name or a mapping with 'experiment'")
        if e["experiment"] not in known:
            raise CampaignError(f"{p}: unknown experiment '{e['experiment']}'; valid: {', '.join(known)}")
        extra = set(e) - {"experiment", "overrides", "name"}
        if extra:
            raise CampaignError(f"{p}: experiments[{i}]: unknown key '{sorted(extra)[0]}'")
        entries.append(
            Entry(str(e.get("name") or e["experiment"]), e["experiment"], _str_list(e.get("overrides"), p.name))
        )
    names = [x.name for x in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise CampaignError(f"{p}: experiment name '{dup}' appears twice; give one of them a 'name:'")
    procs = spec.get("procs", 2)
    if procs != "auto" and (not isinstance(procs, int) or isinstance(procs, bool) or procs < 1):
        raise CampaignError(f"{p}: procs must be a count >= 1 or 'auto', got {procs!r}")
    return Campaign(str(spec.get("name") or p.stem), entries, procs, _str_list(spec.get("overrides"), p.name))


def check_configs(c: Campaign, smoke: bool, data_dir: str | None) -> None:
    """Compose every experiment's config (a typo in an override fails here, before anything runs)."""
    from km.config import compose_config
    from km.overrides import ConfigError

    for e in c.entries:
        try:
            compose_config(_overrides(c, e, smoke, data_dir, Path("."), for_check=True))
        except ConfigError as err:
            raise CampaignError(f"{e.name}: {err}") from None


def _overrides(
    c: Campaign, e: Entry, smoke: bool, data_dir: str | None, runs: Path, for_check: bool = False, last: tuple = ()
) -> list[str]:
    out = [f"experiment={e.experiment}", *(SMOKE_SIZES if smoke else []), *c.overrides, *e.overrides]
    out += [*(SMOKE_FORCED if smoke else []), *last]
    if data_dir:
        out.append(f"data.data_dir={data_dir}")
    if not for_check:
        out += [f"runs_dir={runs}", f"name={e.name}", f"run_id={RUN_ID}", "resume=auto", "trainer.progress_bar=none"]
    return out


# ---- a run's state, from its own files --------------------------------------------------------------------


def run_dir(root: Path, e: Entry) -> Path:
    return root / "runs" / e.name / RUN_ID


def _json(p: Path) -> dict[str, Any]:
    try:
        v = json.loads(p.read_text(encoding="utf-8"))
        return v if isinstance(v, dict) else {}
    except (OSError, ValueError):
        return {}


def run_state(root: Path, e: Entry) -> dict[str, Any]:
    d = run_dir(root, e)
    meta = _json(d / "run.json")
    status = meta.get("status") or "new"
    if status == "finished" and not (d / "eval.json").is_file():
        status = "trained"  # evaluation not written yet: the next slice resumes and evaluates
    return {"status": status, "meta": meta, "eval": _json(d / "eval.json")}


def _epochs_done(root: Path, e: Entry) -> int:
    """Epochs in the run's last checkpoint, from metrics.csv's validation rows (torch-free)."""
    p = run_dir(root, e) / "metrics.csv"
    try:
        import csv

        with open(p, encoding="utf-8", errors="replace", newline="") as f:
            epochs = [r.get("epoch") for r in csv.DictReader(f) if r.get("val/neg_elbo")]
        return len({x for x in epochs if x})
    except OSError:
        return 0


# ---- slices -----------------------------------------------------------------------------------------------


@dataclass
class Job:
    entry: Entry
    proc: subprocess.Popen
    log: Path
    started: float
    offset: int = 0
    last_line: str = ""


def _progress(job: Job) -> str:
    """The latest `step ... | x/s | ETA` or `epoch ...` line of the trainer's log."""
    try:
        with open(job.log, "rb") as f:
            f.seek(job.offset)
            chunk = f.read().decode("utf-8", "replace")
            job.offset = f.tell()
    except OSError:
        return job.last_line
    for line in reversed(chunk.splitlines()):
        if line.startswith(("step ", "epoch ", "test batch", "resuming", "paused")):
            job.last_line = line.strip()
            break
    return job.last_line


def _last_log_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return "?"
    return lines[-1].strip()[:200] if lines else "?"


def _launch(
    c: Campaign, e: Entry, root: Path, smoke: bool, data_dir: str | None, deadline: float, last: tuple = ()
) -> Job:
    log = root / "logs" / f"{e.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "km.cli", "train", *_overrides(c, e, smoke, data_dir, root / "runs", last=last)]
    env = dict(os.environ, KM_STOP_AT=f"{deadline:.0f}", PYTHONUNBUFFERED="1")
    if smoke:
        env["OMP_NUM_THREADS"] = "1"
    f = open(log, "ab")  # noqa: SIM115 - the child holds it; closed when the job ends
    f.write(f"\n==== slice started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd[3:])}\n".encode())
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    f.close()
    return Job(e, proc, log, time.time(), offset=log.stat().st_size)


def _record(root: Path, **updates: Any) -> dict[str, Any]:
    from km.runs import atomic_write_text

    p = root / "campaign.json"
    state = _json(p) | updates
    atomic_write_text(p, json.dumps(state, indent=2))
    return state


def _attempts(root: Path) -> dict[str, int]:
    v = _json(root / "campaign.json").get("failed_attempts")
    return v if isinstance(v, dict) else {}


def run_slice(
    c: Campaign,
    root: Path,
    budget_s: float,
    procs: int,
    smoke: bool = False,
    data_dir: str | None = None,
    progress_s: float = 30.0,
    min_launch_s: float = 30.0,
) -> list[dict[str, Any]]:
    """One slice: start the unfinished runs `procs` at a time until the deadline; returns the final table's rows."""
    t0 = time.time()
    grace_s = min(15.0, 0.03 * budget_s)
    deadline = t0 + budget_s - grace_s
    attempts = _attempts(root)
    todo = []
    for e in c.entries:
        st = run_state(root, e)
        if st["status"] == "finished":
            continue
        if st["status"] == "failed" and attempts.get(e.name, 0) >= MAX_ATTEMPTS:
            continue
        todo.append(e)
    running: list[Job] = []

    def stop_all(signum: int, frame: Any) -> None:
        for j in running:  # a killed trainer resumes from its last checkpoint: nothing finished is lost
            j.proc.kill()
        print(f"campaign: interrupted (signal {signum}); run the same command again to continue", file=sys.stderr)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop_all) for s in (signal.SIGINT, signal.SIGTERM)}
    last_print = 0.0
    print(
        f"campaign {c.name}: {len(todo)} of {len(c.entries)} runs to train, {procs} at a time, "
        f"slice of {budget_s:.0f} s (ends {time.strftime('%H:%M:%S', time.localtime(deadline))})",
        flush=True,
    )
    try:
        while todo or running:
            now = time.time()
            while todo and len(running) < procs:
                e = todo[0]
                epoch_s = float(run_state(root, e)["meta"].get("epoch_seconds") or 0.0)
                if now >= deadline or deadline - now < max(min_launch_s, 1.5 * epoch_s):
                    break  # not enough of the slice left for this run to finish an epoch
                todo.pop(0)
                running.append(_launch(c, e, root, smoke, data_dir, deadline))
                print(f"  {e.name}: started ({run_state(root, e)['status']})", flush=True)
            if not running:
                break
            if now >= deadline + grace_s:  # grace: a trainer that stopped at its epoch end is writing its files
                for j in running:
                    j.proc.kill()
                    j.proc.wait()
                    print(f"  {j.entry.name}: killed at the end of the slice (resumes from its last checkpoint)")
                running.clear()
                break
            for j in list(running):
                rc = j.proc.poll()
                if rc is None:
                    continue
                running.remove(j)
                st = run_state(root, j.entry)
                if st["status"] not in ("finished", "paused"):
                    attempts[j.entry.name] = attempts.get(j.entry.name, 0) + 1
                    _record(root, failed_attempts=attempts)
                err = f": {st['meta'].get('error')}" if st["meta"].get("error") else ""
                if rc != 0 and not err:  # it never got to run.json: its log's last line says why
                    err = f": {_last_log_line(j.log)} (log: {j.log})"
                print(f"  {j.entry.name}: {st['status']} (exit {rc}, {time.time() - j.started:.0f} s){err}", flush=True)
            if now - last_print >= progress_s:
                last_print = now
                for j in running:
                    line = _progress(j)
                    if line:
                        print(f"  {j.entry.name} | {line}", flush=True)
            time.sleep(min(0.5, progress_s))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return table_rows(c, root)


# ---- the table --------------------------------------------------------------------------------------------

COLUMNS = (
    ("joint -ELBO/T", "test/neg_elbo"),
    ("mem-cond", "test/memory_conditional"),
    ("held-out -ELBO/target", "test/heldout"),
)


def table_rows(c: Campaign, root: Path) -> list[dict[str, Any]]:
    rows = []
    for e in c.entries:
        st = run_state(root, e)
        d = run_dir(root, e)
        cfg_epochs = None
        try:
            import yaml

            cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
            cfg_epochs = (cfg.get("trainer") or {}).get("max_epochs")
        except (OSError, ValueError, AttributeError):
            pass
        ev = st["eval"]
        m = ev.get("metrics") or {}
        rows.append(
            {
                "name": e.name,
                "status": st["status"],
                "epochs": f"{_epochs_done(root, e)}/{cfg_epochs if cfg_epochs is not None else '?'}",
                "steps": st["meta"].get("steps"),
                "train_s": st["meta"].get("train_seconds"),
                "epoch_s": st["meta"].get("epoch_seconds"),
                "unit": ev.get("unit", ""),
                "is": ev.get("is_samples"),
                **{k: m.get(key) for k, key in COLUMNS},
                "run_dir": str(d),
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]], device: str) -> str:
    head = ["experiment", "status", "epochs", "steps", "train s", "s/epoch", *(k for k, _ in COLUMNS), "unit", "IS"]
    lines = [
        f"Device: {device}. Test numbers of each finished run (eval.json), each column one protocol.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        vals = [f"{r[k]:.2f}" if isinstance(r[k], float) else "-" for k, _ in COLUMNS]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    r["status"],
                    r["epochs"],
                    str(r["steps"] if r["steps"] is not None else "-"),
                    f"{r['train_s']:.0f}" if isinstance(r["train_s"], int | float) else "-",
                    f"{r['epoch_s']:.1f}" if isinstance(r["epoch_s"], int | float) else "-",
                    *vals,
                    r["unit"] or "-",
                    str(r["is"] if r["is"] is not None else "-"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---- concurrency probe ------------------------------------------------------------------------------------


def measure_procs(
    c: Campaign, root: Path, smoke: bool, data_dir: str | None, probe_s: float, counts: tuple[int, ...] = PROBE_PROCS
) -> tuple[int, dict[int, float]]:
    """Aggregate training steps/s of k copies of the first experiment trained at once, for k in `counts`
    (each for `probe_s` seconds after its first progress line, in a scratch folder): the k with the most steps/s
    wins. The rates are each trainer's own progress-line rate, so start-up and compile time are left out."""
    import re
    import shutil

    e0 = c.entries[0]
    rates: dict[int, float] = {}
    for k in counts:
        scratch = root / "probe" / f"procs{k}"
        shutil.rmtree(scratch, ignore_errors=True)
        probe = Campaign(
            c.name, [Entry(f"{e0.name}_p{i}", e0.experiment, e0.overrides) for i in range(k)], k, c.overrides
        )
        far = time.time() + 10 * probe_s + 600
        interval = max(1.0, probe_s / 4)
        jobs = []
        last = (f"trainer.progress_interval={interval}", "test_after_fit=false", "trainer.max_epochs=100000")
        for ent in probe.entries:
            jobs.append(_launch(probe, ent, scratch, smoke, data_dir, far, last=last))
        seen: dict[str, float] = {}
        first: float | None = None
        t_end = time.time() + 10 * probe_s + 300
        while time.time() < t_end:
            time.sleep(0.5)
            for j in jobs:
                line = _progress(j)
                m = re.search(r"\| ([0-9.]+)/s \|", line) if line.startswith("step ") else None
                if m:
                    seen[j.entry.name] = float(m.group(1))
                    first = first or time.time()
            if all(j.proc.poll() is not None for j in jobs):
                break
            if first and time.time() - first >= probe_s and len(seen) == k:
                break
        for j in jobs:
            j.proc.kill()
            j.proc.wait()
        rates[k] = sum(seen.values())
        print(f"  procs {k}: {rates[k]:.2f} steps/s in all ({len(seen)} of {k} trainers reporting)", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    best = max(rates, key=lambda k: rates[k])
    return best, rates


# ---- the command ------------------------------------------------------------------------------------------


def _device_name(smoke: bool) -> str:
    if smoke:
        return "CPU (--smoke)"
    import torch

    if not torch.cuda.is_available():
        raise CampaignError("no CUDA device here; a campaign trains at paper sizes on a GPU (--smoke: tiny, on CPU)")
    return torch.cuda.get_device_name()


def add_arguments(p: Any) -> None:
    p.add_argument("file", help="campaign file (YAML): name, procs, overrides, experiments (campaigns/*.yaml)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall seconds this slice may take (default 540)")
    p.add_argument(
        "--procs", default=None, help="trainers at once: a count, or auto (measure 1, 2, 4); default: the file's"
    )
    p.add_argument("--dir", default=None, help="campaign folder (default: runs/campaigns/<name>)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the same code path, in seconds")
    p.add_argument(
        "--data-dir", default=None, help="data directory for every run (default: KM_DATA_DIR, ../shared/data)"
    )
    p.add_argument("--progress-s", type=float, default=30.0, help="seconds between progress lines (default 30)")
    p.add_argument(
        "--probe-s", type=float, default=45.0, help="procs auto: seconds each count is measured (default 45)"
    )


def _procs(value: Any) -> int | str:
    if value in (None, "auto"):
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise CampaignError(f"--procs {value}: must be a count >= 1 or auto")
    return n


def main(args: Any) -> None:
    c = load_campaign(args.file)
    procs = _procs(args.procs) or c.procs
    if args.budget_s <= 0 or args.progress_s <= 0 or args.probe_s <= 0:
        raise CampaignError("--budget-s, --progress-s and --probe-s must be > 0 seconds")
    root = Path(args.dir) if args.dir else Path("runs") / "campaigns" / c.name
    if root.exists() and not root.is_dir():
        raise CampaignError(f"--dir {root} is a file, not a folder")
    for e in c.entries:  # a budget that cannot hold one epoch of a run (measured in an earlier slice)
        st = run_state(root, e)
        epoch_s = float(st["meta"].get("epoch_seconds") or 0.0)
        if st["status"] != "finished" and epoch_s and args.budget_s < 1.5 * epoch_s:
            raise CampaignError(
                f"--budget-s {args.budget_s:g} is below what one epoch of {e.name} needs ({epoch_s:.0f} s measured, "
                f"x 1.5 for start-up); give at least {1.5 * epoch_s:.0f}"
            )
    device = _device_name(args.smoke)
    check_configs(c, args.smoke, args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if procs == "auto":
        known = _json(root / "campaign.json").get("procs_measured")
        if isinstance(known, int) and known >= 1:
            procs = known
            print(f"procs auto: {procs} (measured earlier, campaign.json)")
        else:
            print(f"procs auto: measuring 1, 2 and 4 trainers of {c.entries[0].name} at once ...", flush=True)
            procs, rates = measure_procs(c, root, args.smoke, args.data_dir, args.probe_s)
            _record(root, procs_measured=procs, procs_rates={str(k): v for k, v in rates.items()}, device=device)
            print(f"procs auto: {procs} (the most steps/s)")
    spent = time.time() - t0
    small = 5.0 if args.smoke else 30.0
    if args.budget_s - spent < small:
        print(f"the slice's {args.budget_s:g} s went to measuring procs ({spent:.0f} s); run again to train")
    rows = run_slice(
        c,
        root,
        args.budget_s - spent,
        int(procs),
        smoke=args.smoke,
        data_dir=args.data_dir,
        progress_s=args.progress_s,
        min_launch_s=small,
    )
    text = render_table(rows, device)
    from km.runs import atomic_write_text

    atomic_write_text(root / "table.md", text)
    _record(root, device=device, last_slice=time.strftime("%Y-%m-%dT%H:%M:%S"), slice_seconds=round(time.time() - t0))
    print(text, end="")
    left = [r["name"] for r in rows if r["status"] != "finished"]
    if left:
        print(f"unfinished: {', '.join(left)}; continue with the same command (km campaign {args.file} ...)")
    else:
        print(f"every run finished; table: {root / 'table.md'}")
