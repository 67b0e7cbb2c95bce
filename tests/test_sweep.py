"""`km sweep`: the offline engine (W&B's `sweeps` package) driving real tiny `km train` runs.

The online path (wandb.sweep / wandb agent) needs a W&B server and is not tested here beyond its
missing-credentials error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import needs_data, tiny

from km import sweep
from km.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# tiny() plus an even smaller budget: one epoch, one torch thread (much faster on 2 shared cores)
FAST = (
    "trainer.max_epochs=1",
    "data.train_episodes_per_epoch=8",
    "data.val_episodes=8",
    "data.test_episodes=8",
    "eval.is_samples=2",
    "trainer.num_threads=1",
)


def _spec(tmp_path: Path, parameters: dict, **extra) -> Path:
    spec = {
        "method": "grid",
        "metric": {"name": "test/neg_elbo", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "km", "train", "${args_no_hyphens}"],
        **extra,
    }
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _unswept(overrides: list[str], *swept: str) -> list[str]:
    """The fixed overrides of a sweep without the keys its spec sweeps (`--set` of those is refused)."""
    return [o for o in overrides if o.split("=", 1)[0] not in swept]


def _state(d: Path) -> dict:
    return json.loads((d / "state.json").read_text())


@needs_data
def test_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = _spec(tmp_path, {"data.batch_size": {"values": [0, 4]}})
    d = sweep.start_local(spec, tmp_path / "sw", _unswept(tiny(tmp_path, *FAST), "data.batch_size"))
    summary = sweep.run_agent(d)
    assert summary["started"] == 2 and summary["failed"] == 1
    bad, good = _state(d)["runs"]
    assert bad["config"] == {"data.batch_size": 0} and bad["status"] == "failed"
    assert bad["exit_code"] not in (0, None) and bad["error"] and bad["metric"] is None
    assert good["status"] == "finished" and isinstance(good["metric"], float)
    assert bad["error"] in sweep.status_table(d)
    assert f"{bad['name']} failed" in capsys.readouterr().out


def test_bayes_and_random_suggestions_stay_in_range() -> None:
    spec = sweep.load_spec(ROOT / "sweeps" / "km_mnist_lr_memory.yaml")
    lr, mem = spec["parameters"]["model.lr"], spec["parameters"]["model.memory_size"]["values"]
    fake = [
        {
            "name": f"r{i:03d}",
            "status": "finished",
            "metric": 300.0 + (i * 7) % 11,
            "history": [],
            "config": {
                "model": "km",
                "data": "mnist",
                "model.lr": 10 ** (-3.8 + 0.3 * i),
                "model.memory_size": mem[i % 3],
                "trainer.max_epochs": 3,
                "data.train_episodes_per_epoch": 64,
                "data.val_episodes": 64,
                "data.test_episodes": 64,
                "eval.is_samples": 20,
                "seed": 1,
            },
        }
        for i in range(5)
    ]
    fake.append({**fake[0], "name": "r006", "status": "failed", "metric": None})
    for method in ("bayes", "random"):
        for _ in range(5):
            cfg = sweep.suggest({**spec, "method": method}, fake)
            assert lr["min"] <= cfg["model.lr"] <= lr["max"], cfg
            assert cfg["model.memory_size"] in mem and cfg["model"] == "km" and cfg["trainer.max_epochs"] == 3
            json.dumps(cfg)  # plain values, storable in state.json


def test_shipped_specs_and_grid_exhaustion() -> None:
    for p in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = sweep.load_spec(p)
        assert spec["metric"]["name"] in ("test/neg_elbo", "val/neg_elbo", "test_class/heldout")
        assert sweep.suggest(spec, []) is not None, p
    spec = sweep.load_spec(ROOT / "sweeps" / "compare_baselines.yaml")
    runs: list[dict] = []
    while (cfg := sweep.suggest(spec, runs)) is not None:
        runs.append({"name": f"r{len(runs) + 1:03d}", "config": cfg, "status": "finished", "metric": 1.0})
    assert {(r["config"]["model"], r["config"]["data"], r["config"]["seed"]) for r in runs} == {
        (m, d, s) for m in ("vae", "km", "dkm", "pkm", "kpp_cpu") for d in ("mnist", "omniglot") for s in (1, 2)
    }
    cmd = sweep.build_command(spec, {"name": "sw", "overrides": ["seed=9", "trainer.max_epochs=1"]}, runs[0], [])
    assert cmd[1:4] == ["-m", "km.cli", "train"] and cmd[-3:] == ["name=sw", "run_id=r001", "resume=auto"]
    assert "seed=9" not in cmd and "trainer.max_epochs=1" not in cmd  # swept values win over fixed ones


def test_hyperband_stops_a_lagging_run() -> None:
    spec = {
        "method": "grid",
        "metric": {"name": "test/neg_elbo", "goal": "minimize"},
        "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
        "parameters": {"seed": {"values": [1, 2, 3, 4]}},
    }
    done = [
        {
            "name": f"r00{i}",
            "status": "finished",
            "metric": 100.0 - i,
            "history": [110.0 - i, 100.0 - i],
            "config": {"seed": i},
        }
        for i in (1, 2)
    ]
    bad = {"name": "r003", "status": "running", "metric": None, "history": [150.0], "config": {"seed": 3}}
    good = {**bad, "history": [105.0]}
    assert sweep.should_stop(spec, [*done, bad], "r003")
    assert not sweep.should_stop(spec, [*done, good], "r003")
    assert not sweep.should_stop({**spec, "early_terminate": None}, [*done, bad], "r003")


def test_online_without_credentials_is_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from km.cli import build_parser

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for argv in (["sweep", "start", str(ROOT / "sweeps" / "compare_baselines.yaml")], ["sweep", "agent", "abc123"]):
        args = build_parser().parse_args(argv)
        with pytest.raises(SystemExit) as e:
            args.func(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and "--local" in err


def test_run_lock_outlives_nothing_and_an_agent_waits_for_an_orphaned_trainer(tmp_path: Path) -> None:
    """The lock is held exactly while its process lives (SIGKILL releases it), and a restarted agent waits for
    the trainer a killed agent left running instead of starting a second one on the same run."""
    from km.runs import lock_holder
    from km.sweep import wait_for_trainer

    run_dir = tmp_path / "run"
    hold = (
        "import sys, time; from km.runs import RunLock; l = RunLock(sys.argv[1]).acquire(); print('held', flush=True);"
        " time.sleep(float(sys.argv[2]))"
    )
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.Popen([sys.executable, "-c", hold, str(run_dir), "60"], stdout=subprocess.PIPE, text=True, cwd=root)
    assert p.stdout.readline().strip() == "held"
    assert lock_holder(run_dir) == str(p.pid)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert lock_holder(run_dir) is None  # a killed trainer never leaves its run locked
    assert wait_for_trainer(run_dir, "r001") is False

    p = subprocess.Popen([sys.executable, "-c", hold, str(run_dir), "1.5"], stdout=subprocess.PIPE, text=True, cwd=root)
    assert p.stdout.readline().strip() == "held"
    t0 = time.time()
    assert wait_for_trainer(run_dir, "r001", poll=0.1) is True
    assert time.time() - t0 > 0.5 and p.wait(timeout=10) == 0 and lock_holder(run_dir) is None
    p.stdout.close()


def _agent(d: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "km.cli", "sweep", "agent", str(d)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait(what: str, ok, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ok():
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the agent ended before {what}"
        time.sleep(0.05)


@needs_data
def test_sweep_agents_killed_with_9_lose_nothing_and_train_nothing_twice(tmp_path: Path) -> None:
    """A 2-run grid. (1) kill -9 the agent alone during r001: its trainer (own session) goes on; (2) a second
    agent waits for that orphan instead of starting a second trainer on r001, records it, and starts r002;
    (3) kill -9 that agent AND its trainer after r002's first epoch; (4) a third agent resumes r002 from its
    last checkpoint and exhausts the grid. No run trained twice, no metrics row twice, no second checkpoint set."""
    from km.runs import lock_holder, read_meta

    spec = _spec(tmp_path, {"seed": {"values": [1, 2]}})
    d = sweep.start_local(spec, tmp_path / "sw", _unswept(tiny(tmp_path, *FAST, "trainer.max_epochs=4"), "seed"))
    runs_root = tmp_path / "runs" / "sw"
    r1, r2 = runs_root / "r001", runs_root / "r002"

    a = _agent(d)
    try:
        _wait("r001's trainer", lambda: lock_holder(r1) is not None, a)
    finally:
        a.kill()  # the agent alone
        a.wait()
    orphan = lock_holder(r1)
    assert orphan is not None, "the trainer outlives its agent"

    b = _agent(d)
    try:
        _wait("r002's first epoch", lambda: (r2 / "checkpoints" / "last.ckpt").exists(), b)
        trainer2 = lock_holder(r2)
    finally:
        b.kill()
        b.wait()
    assert trainer2 is not None and read_meta(r1)["status"] == "finished" and read_meta(r1)["pid"] == int(orphan)
    os.kill(int(trainer2), signal.SIGKILL)  # r002's trainer dies too: interrupted mid-run
    _wait("r002's trainer to die", lambda: lock_holder(r2) is None, timeout=30)
    assert read_meta(r2)["status"] == "running"

    summary = sweep.run_agent(d)  # restart, in-process
    assert summary == {"started": 1, "failed": 0, "reason": "the grid is exhausted"}
    runs = {r["name"]: r for r in _state(d)["runs"]}
    assert sorted(runs) == ["r001", "r002"] and _state(d)["exhausted"]
    for name, run in (("r001", r1), ("r002", r2)):
        rec = runs[name]
        assert rec["status"] == "finished" and isinstance(rec["metric"], float) and rec["attempts"] == 2, rec
        epochs = [row["epoch"] for row in read_metrics(run) if row.get("val/neg_elbo")]
        assert epochs == ["0", "1", "2", "3"], (name, epochs)  # each epoch validated once
        ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert len(ckpts) == 2 and "last.ckpt" in ckpts and not any("-v" in n for n in ckpts), ckpts
    assert "resuming" in (d / "logs" / "r002.err").read_text()  # r002 continued from its checkpoint
    saved = yaml.safe_load((r2 / "config.yaml").read_text())
    assert saved["seed"] == runs["r002"]["config"]["seed"]
    table = sweep.status_table(d)
    assert "r002" in table and "* best" in table


def test_status_plot_draws_the_metric_against_each_swept_parameter(tmp_path: Path, capsys) -> None:
    """km sweep status D --plot: one panel per parameter that differs between runs (lr on a log axis, a string
    choice as categories), read from state.json alone (a table made in-process, no training)."""
    from conftest import png_text

    from km.cli import main
    from km.sweep.state import write_state

    d = sweep.start_local(
        _spec(tmp_path, {"model.lr": {"values": [1e-4, 1e-3, 1e-2]}, "model.name": {"values": ["vae", "km"]}}),
        tmp_path / "sw",
    )
    state = sweep.read_state(d)
    for i, (lr, m, metric, status) in enumerate(
        [
            (1e-4, "vae", 120.0, "finished"),
            (1e-3, "km", 110.0, "finished"),
            (1e-2, "km", 130.0, "stopped"),
            (1e-3, "vae", None, "failed"),
        ],
        1,
    ):
        state["runs"].append(
            {
                "name": f"r{i:03d}",
                "config": {"model.lr": lr, "model.name": m, "seed": 1},
                "status": status,
                "metric": metric,
            }
        )
    write_state(d, state)
    main(["sweep", "status", str(d), "--plot"])
    out = capsys.readouterr().out
    assert f"plot: {d / 'sweep.png'}" in out and "r002" in out
    text = png_text(d / "sweep.png")
    assert text["Description"].splitlines() == ["x: model.lr, y: test/neg_elbo", "x: model.name, y: test/neg_elbo"]
    assert "3 run(s) with a metric" in text["Title"] and "(minimize)" in text["Title"]
    main(["sweep", "status", str(d), "--plot", str(tmp_path / "elsewhere.png")])
    assert (tmp_path / "elsewhere.png").is_file()
    empty = sweep.start_local(_spec(tmp_path, {"model.lr": {"values": [1e-3]}}), tmp_path / "empty")
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "status", str(empty), "--plot"])
    assert exc.value.code == 2 and "no run has a metric yet" in capsys.readouterr().err
