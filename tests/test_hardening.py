"""Issue #30: what used to lose or damage runs. Signals to a real trainer (SIGTERM, SIGINT) leave a resumable
run, a non-zero exit and one line; a sweep point whose trainer got SIGTERM is trained again by the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from km import sweep
from km.runs import epoch_metrics, lock_holder, read_meta
from tests.conftest import needs_data, tiny

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_data


def _default_sigint() -> None:
    """A suite started in the background (`cmd &` in a script, nohup) hands its children SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler: give the trainer the SIGINT a terminal user's has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    kw.setdefault("preexec_fn", _default_sigint)
    return subprocess.Popen(
        [sys.executable, "-m", "km.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait(what: str, ok, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ok():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_trainer_exits_non_zero_in_one_line_and_resumes(tmp_path: Path, sig, code) -> None:
    ov = tiny(tmp_path, "trainer.max_epochs=30", "run_id=sig", "test_after_fit=false")
    run = tmp_path / "runs" / "default" / "sig"
    p = _popen("train", *ov)
    _wait("the first epoch's checkpoint", lambda: (run / "checkpoints" / "last.ckpt").exists() or p.poll() is not None)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err[-2000:]
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"error: interrupted by {sig.name}; it keeps last.ckpt: continue with km train resume=")
    meta = read_meta(run)
    assert meta["status"] == "interrupted" and meta["last_good_checkpoint"].endswith("last.ckpt")
    done = sorted(epoch_metrics(run, "val/neg_elbo"))
    p = _popen("train", *tiny(tmp_path, "trainer.max_epochs=" + str(len(done) + 1), "run_id=sig", "resume=auto"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "resuming" in err, err[-2000:]
    assert sorted(epoch_metrics(run, "val/neg_elbo")) == list(range(len(done) + 1))
    assert read_meta(run)["status"] == "finished"


def test_a_sweep_point_whose_trainer_got_sigterm_is_trained_again(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "method: grid\nmetric: {name: test/neg_elbo, goal: minimize}\nparameters: {seed: {values: [1]}}\n"
        "command: ['${env}', km, train, '${args_no_hyphens}']\n"
    )
    fixed = [o for o in tiny(tmp_path, "trainer.max_epochs=6", "logger=csv") if not o.startswith("seed=")]
    d = sweep.start_local(spec, tmp_path / "sw", fixed)
    run = tmp_path / "runs" / "sw" / "r001"
    agent = _popen("sweep", "agent", str(d), start_new_session=True)
    try:
        _wait("r001's first epoch", lambda: (run / "checkpoints" / "last.ckpt").exists())
        pid = lock_holder(run)
        assert pid is not None
        os.kill(int(pid), signal.SIGTERM)  # what a scheduler or an OOM reaper sends the trainer
        out, _ = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, out[-2000:]
    assert "r001 interrupted (exit 143)" in out, out[-2000:]
    (rec,) = json.loads((d / "state.json").read_text())["runs"]
    assert rec["status"] == "finished" and rec["attempts"] == 2 and isinstance(rec["metric"], float), rec
    assert sorted(epoch_metrics(run, "val/neg_elbo")) == list(range(6))  # every epoch once
    assert "resuming" in (d / "logs" / "r001.err").read_text()


# ---- 2. a refused resume leaves the run byte for byte as it was -------------------------------------------


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def _fails(args: list[str], capsys, code: int = 2) -> str:
    from km.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from km.config import compose_config
    from km.train import train

    tmp = tmp_path_factory.mktemp("finished")
    return Path(train(compose_config(tiny(tmp, "trainer.max_epochs=3", "run_id=done")))["run_dir"])


def test_a_smaller_budget_than_trained_is_refused_and_changes_nothing(finished_run: Path, capsys) -> None:
    before = _snapshot(finished_run)
    err = _fails(["train", f"resume={finished_run}", "trainer.max_epochs=1"], capsys)
    assert "has trained 3 epochs, more than trainer.max_epochs=1" in err
    assert _snapshot(finished_run) == before


def test_a_damaged_metrics_file_is_refused_before_the_run_is_touched(finished_run: Path, tmp_path: Path, capsys):
    import shutil

    from km.compare import collect

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    (run / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes() + b"\xff\xfe,bad\n")
    before = _snapshot(run)
    err = _fails(["train", f"resume={run}", "trainer.max_epochs=4"], capsys)
    assert "metrics.csv is not UTF-8 text" in err
    assert _snapshot(run) == before
    assert collect([run])  # km compare reads the run (without its curves) instead of tracing back


def test_resuming_a_finished_run_says_so_and_runs_nothing(finished_run: Path, capsys) -> None:
    from km.cli import main

    before = _snapshot(finished_run)
    main(["train", f"resume={finished_run}"])
    out = capsys.readouterr().out
    assert f"{finished_run} is finished (3 of 3 epochs" in out and "trainer.max_epochs=6" in out
    assert _snapshot(finished_run) == before


# ---- 3. a trainer that loses the race for a run id refuses once it holds the lock -------------------------


def test_a_racing_trainer_never_replaces_a_finished_run(tmp_path: Path, monkeypatch, capsys) -> None:
    import km.train
    from km.config import compose_config

    first = tiny(tmp_path, "name=dup", "run_id=race", "seed=1", "trainer.max_epochs=1")
    real = km.train.check_memory_budget
    calls = []

    def slow_start(cfg, shape):  # the second trainer is delayed after its checks, before it takes the lock
        calls.append(1)
        if len(calls) == 1:
            km.train.train(compose_config(first))  # the first trainer runs the whole run meanwhile
        return real(cfg, shape)

    monkeypatch.setattr(km.train, "check_memory_budget", slow_start)
    err = _fails(["train", *tiny(tmp_path, "name=dup", "run_id=race", "seed=2", "trainer.max_epochs=1")], capsys)
    assert "already holds a run (another trainer created it while this one was starting)" in err
    run = tmp_path / "runs" / "dup" / "race"
    assert read_meta(run)["status"] == "finished" and read_meta(run)["seed"] == 1
    assert "seed: 1" in (run / "config.yaml").read_text()


# ---- 4, 5. divergence: exit 3 in one line, advice that can work -------------------------------------------


@pytest.mark.parametrize("model", ["km", "pkm"])
def test_a_diverged_memory_in_the_sample_grid_exits_3(tmp_path: Path, model: str, capsys) -> None:
    args = tiny(tmp_path, f"model={model}", "model.lr=0.1", "trainer.max_epochs=40", "net.channels=[4,4,4]")
    err = _fails(["train", *args, "net.embed_dim=16", "model.code_dim=8"], capsys, code=3)
    assert err.startswith("error: training stopped: non-finite")


def test_a_resume_that_diverges_at_once_says_resuming_cannot_help(tmp_path: Path, monkeypatch, capsys) -> None:
    from km.config import compose_config
    from km.models import VAE
    from km.train import train

    run = Path(train(compose_config(tiny(tmp_path, "trainer.max_epochs=1", "run_id=stuck")))["run_dir"])
    real = VAE.episode_elbo

    def poisoned(self, x, *a, **k):  # the kept checkpoint gives a non-finite loss on its first batch
        out = real(self, x, *a, **k)
        if self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VAE, "episode_elbo", poisoned)
    err = _fails(["train", f"resume={run}", "trainer.max_epochs=3", "model.lr=1e-4"], capsys, code=3)
    assert "resuming cannot help" in err and "start a new run" in err


@pytest.mark.parametrize("key", ["model.kl_weights.z=inf", "model.weight_decay=nan", "model.lr=-inf"])
def test_non_finite_values_are_refused_up_front(tmp_path: Path, key: str, capsys) -> None:
    err = _fails(["train", *tiny(tmp_path, key)], capsys)
    assert f"bad value for '{key.split('=')[0]}'" in err and "finite" in err
    assert not (tmp_path / "runs").exists()


def test_sigma_xi_inf_is_refused(tmp_path: Path, capsys) -> None:
    err = _fails(["train", *tiny(tmp_path, "model=km", "model.sigma_xi=inf")], capsys)
    assert "bad value for 'model.sigma_xi'" in err


# ---- 12. a copied run resumes without Lightning's dirpath warning and keeps its best-epoch record ---------


def test_a_copied_run_keeps_its_best_checkpoint_record_without_a_warning(tmp_path: Path) -> None:
    import shutil
    import warnings

    import torch

    from km.config import compose_config
    from km.train import train

    common = ["trainer.max_epochs=2", "test_after_fit=false"]
    first = Path(train(compose_config(tiny(tmp_path, *common, "run_id=orig")))["run_dir"])
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy, ignore=shutil.ignore_patterns(".lock"))
    ov = [f"resume={copy}", "trainer.max_epochs=3", "test_after_fit=false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_config(tiny(tmp_path, *ov)), ov)
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    cbs = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    best = next(v for k, v in cbs.items() if "val/" in k)  # the best-epoch callback (monitored)
    assert best["best_model_path"].startswith(str(copy / "checkpoints"))
    assert Path(best["best_model_path"]).exists() and best["best_model_score"] is not None


# ---- 6. values Lightning would refuse after the data loaded: one line, before anything is written --------


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.strategy=bogus", "bad value for 'trainer.strategy': bogus (valid: auto, ddp"),
        ("checkpoint.monitor=bogus", "bad value for 'checkpoint.monitor': bogus (the model logs: val/heldout,"),
        ("trainer.limit_val_batches=inf", "bad value for 'trainer.limit_val_batches': inf (must be a finite"),
        ("run_id=" + "a" * 300, "bad value for 'run_id'"),
        ("name=café", "cannot parse 'name=café': Hydra's override grammar takes ASCII only"),
    ],
)
def test_values_that_used_to_trace_back_are_one_line(tmp_path: Path, override: str, says: str, capsys) -> None:
    err = _fails(["train", *tiny(tmp_path, override)], capsys)
    assert err.startswith(f"error: {says}"), err
    assert not (tmp_path / "runs").exists()


def test_a_gpu_accelerator_without_cuda_is_one_line(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _fails(["train", *tiny(tmp_path, "trainer.accelerator=gpu")], capsys)
    assert "trainer.accelerator=gpu but this machine has no CUDA device" in err
    assert not (tmp_path / "runs").exists()


def test_a_monitor_the_model_logs_is_accepted(tmp_path: Path) -> None:
    from km.config import compose_config
    from km.train import train

    s = train(compose_config(tiny(tmp_path, "model=km", "checkpoint.monitor=val/heldout", "trainer.max_epochs=1")))
    assert read_meta(Path(s["run_dir"]))["status"] == "finished"


# ---- 8. sweeps: specs refused at start, damaged state in one line ----------------------------------------


@pytest.mark.parametrize(
    "params, says",
    [
        ({"seed": {"values": []}}, "parameter seed: 'values' must be a non-empty list"),
        ({"seed": 3}, "parameter seed: give a mapping"),
        ({"model.lr": {"min": 0.1, "max": 0.01}}, "parameter model.lr: min 0.1 must be below max 0.01"),
        ({"model.lrr": {"values": [0.1]}}, "unknown config key 'model.lrr'"),
        ({"seed": {"valuez": [1]}}, "parameter seed: unknown key 'valuez'"),
    ],
)
def test_bad_sweep_specs_are_refused_at_start(tmp_path: Path, params: dict, says: str, capsys) -> None:
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"method": "grid", "parameters": params, "command": ["km", "train"]}))
    err = _fails(["sweep", "start", str(spec), "--local", "--dir", str(tmp_path / "sw")], capsys)
    assert says in err, err
    assert not (tmp_path / "sw").exists()


def test_a_sweep_dir_that_is_a_file_and_damaged_state_are_one_line(tmp_path: Path, capsys) -> None:
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [1]}}}))
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _fails(
        ["sweep", "start", str(spec), "--local", "--dir", str(tmp_path / "file")], capsys
    )
    d = tmp_path / "sw"
    sweep.start_local(spec, d)
    state = json.loads((d / "state.json").read_text())
    for bad in (["not a record"], [{"status": "running", "config": {}}]):
        (d / "state.json").write_text(json.dumps({**state, "runs": bad}))
        for cmd in (["sweep", "status", str(d)], ["sweep", "agent", str(d)]):
            assert "runs[0] is not a run record" in _fails(cmd, capsys)


# ---- 9. messages that name the real problem ---------------------------------------------------------------


def test_checkpoint_messages_name_the_real_problem(finished_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not a checkpoint\n")
    err = _fails(["eval", str(text)], capsys)
    assert "is not a checkpoint (a torch checkpoint is a zip file" in err and "could run code" not in err
    err = _fails(["train", f"resume={text}"], capsys)
    assert f"cannot resume from {text}: not a checkpoint of a run" in err
    run = tmp_path / "trunc"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    err = _fails(["train", f"resume={run}", "trainer.max_epochs=5"], capsys)
    assert "is damaged or truncated" in err and "best-epoch" in err  # points at the intact best checkpoint


def test_eval_refuses_a_foreign_models_checkpoint_placed_in_a_run(finished_run: Path, tmp_path: Path, capsys):
    import shutil

    from km.config import compose_config
    from km.train import train

    km_run = Path(train(compose_config(tiny(tmp_path, "model=km", "trainer.max_epochs=1", "run_id=km")))["run_dir"])
    vae = tmp_path / "vae"
    shutil.copytree(finished_run, vae, ignore=shutil.ignore_patterns(".lock"))
    before = (vae / "eval.json").read_bytes()
    foreign = vae / "checkpoints" / "foreign.ckpt"
    shutil.copy(km_run / "checkpoints" / "last.ckpt", foreign)
    err = _fails(["eval", str(foreign)], capsys)
    assert "was trained as model 'km'" in err and "is a 'vae' run" in err
    assert (vae / "eval.json").read_bytes() == before


# ---- 10. km compare --out: never a half-written report --------------------------------------------------


def test_compare_outputs_are_whole_or_untouched(finished_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import km.compare.render as render

    out = tmp_path / "report"
    from km.cli import main

    main(["compare", str(finished_run), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert before["metric_bars.png"] and before["table.md"]

    def full_disk(agg, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render, "plot_bars", full_disk)  # ENOSPC half way through the set
    err = _fails(["compare", str(finished_run), "--out", str(out)], capsys)
    assert "No space left on device; the files there before are untouched" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing 0-byte, no staging left


# ---- 7. the file system: one line, and a cache never stops a run ------------------------------------------


@pytest.mark.parametrize("where", ["run_dir", "runs_dir"])
def test_a_run_path_that_is_a_file_is_one_line(tmp_path: Path, where: str, capsys) -> None:
    runs = tmp_path / "runs"
    if where == "run_dir":
        (runs / "default").mkdir(parents=True)
        (runs / "default" / "plain").write_text("x")
        args = tiny(tmp_path, "run_id=plain")
    else:
        runs.write_text("x")
        args = tiny(tmp_path)
    err = _fails(["train", *args], capsys)
    assert "exists as a file, not a folder" in err


def test_a_cache_that_cannot_be_written_never_stops_a_run(tmp_path: Path, monkeypatch) -> None:
    from datamodules.paths import DataFiles, cached_md5

    f = DataFiles("mnist")
    path = f.root / "binarized_mnist" / "binarized_mnist.npz"
    want = cached_md5(path, fresh=True)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path / "afile"))  # a cache dir that is a file
    assert cached_md5(path) == want
    monkeypatch.delenv("KM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "afile"))  # ~/.cache cannot be made
    assert cached_md5(path) == want
    f.verified("binarized_mnist/binarized_mnist.npz")


def test_a_manifest_of_the_wrong_shape_is_ignored(tmp_path: Path) -> None:
    import json

    from datamodules.paths import DataFiles
    from tests.conftest import DATA_DIR

    data = tmp_path / "data"
    (data / "binarized_mnist").mkdir(parents=True)
    (data / "binarized_mnist" / "binarized_mnist.npz").symlink_to(DATA_DIR / "binarized_mnist" / "binarized_mnist.npz")
    for manifest in ([1, 2], {"md5": ["not", "a", "mapping"]}, {"md5": {"binarized_mnist/binarized_mnist.npz": 3}}):
        (data / "km_manifest.json").write_text(json.dumps(manifest))
        assert DataFiles("mnist", data).verified("binarized_mnist/binarized_mnist.npz").is_file()


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["data.val_size=5"], "data.val_size=5: mnist uses the fixed Larochelle split"),
        (["data.eval_episodes=class", "data.classes_per_episode=20"], "data.classes_per_episode=20 but the mnist test"),
        (["eval.class_episodes=true", "data.classes_per_episode=20"], "data.classes_per_episode=20 but the mnist test"),
    ],
)
def test_data_values_that_failed_late_are_one_line_before_training(tmp_path: Path, overrides, says, capsys):
    err = _fails(["train", *tiny(tmp_path, *overrides)], capsys)
    assert err.startswith(f"error: {says}"), err
    assert not (tmp_path / "runs").exists()


def test_a_full_disk_during_km_eval_is_one_line_and_keeps_the_old_results(
    finished_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import errno
    import shutil

    import km.evaluate

    run = tmp_path / "full"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    before = (run / "eval.json").read_bytes()

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(km.evaluate, "atomic_write_text", full)
    err = _fails(["eval", str(run)], capsys)
    assert err.startswith("error: No space left on device (") and "eval.json" in err
    assert (run / "eval.json").read_bytes() == before


def test_sweep_set_of_a_key_the_spec_sets_is_refused_and_other_keys_reach_the_runs(tmp_path: Path, capsys) -> None:
    import yaml

    from km.sweep.agent import build_command

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"method": "grid", "parameters": {"seed": {"values": [1, 2]}, "trainer.max_epochs": {"value": 10}}}
        )
    )
    err = _fails(
        ["sweep", "start", str(spec), "--local", "--dir", str(tmp_path / "a"), "--set", "trainer.max_epochs=2"], capsys
    )
    assert "--set trainer.max_epochs=2: the spec sets trainer.max_epochs under parameters" in err
    assert not (tmp_path / "a").exists()
    d = sweep.start_local(spec, tmp_path / "b", ["eval.is_samples=3"])
    state = json.loads((d / "state.json").read_text())
    cmd = build_command(yaml.safe_load(spec.read_text()), state, {"name": "r001", "config": {"seed": 1}}, [])
    assert "eval.is_samples=3" in cmd
    err = _fails(["sweep", "agent", str(d), "--set", "seed=5"], capsys)
    assert "the spec sets seed under parameters" in err
