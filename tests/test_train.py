"""Runs: the VAE learns on real MNIST, the CLI end to end, exact resume, kill-and-resume,
NaN stop with the last good checkpoint kept, atomic checkpoints, incompatible checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from km.callbacks import AtomicCheckpointIO
from km.cli import main
from km.config import compose_config
from km.models import VAE, NonFiniteLossError
from km.runs import epoch_metrics, read_meta, read_metrics
from km.train import quiet_lightning, train
from tests.conftest import needs_data, tiny

pytestmark = needs_data


def _km(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "km.cli", *args], capture_output=True, text=True, env=e, timeout=600)


def _killed_at(step: int, *args: str) -> subprocess.CompletedProcess:
    """`km ARGS` SIGKILLed once training reaches `step` (tests/killer.py)."""
    e = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "tests.killer", str(step), "km", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _assert_same_run(a: Path, b: Path) -> None:
    for key in ("val/neg_elbo", "val/recon", "val/kl", "train/loss_epoch"):
        ma, mb = epoch_metrics(a, key), epoch_metrics(b, key)
        assert ma and ma == mb, (key, ma, mb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_vae_loss_falls_on_real_mnist(tmp_path: Path) -> None:
    cfg = compose_config(
        tiny(
            tmp_path,
            "trainer.max_epochs=3",
            "data.train_episodes_per_epoch=64",
            "model.lr=3e-3",
            "test_after_fit=false",
        )
    )
    run_dir = Path(train(cfg)["run_dir"])
    val = epoch_metrics(run_dir, "val/neg_elbo")
    assert sorted(val) == [0, 1, 2]
    assert val[2] < val[0] - 50, val  # nats/image; an untrained model starts near 540
    assert val[2] < 250, val


def test_cli_train_then_eval_with_wandb_offline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        a
        for a in tiny(tmp_path, "run_id=cli", "name=smoke", "eval.class_episodes=true", "data.classes_per_episode=1")
        if a != "logger=csv"
    ] + ["logger=wandb"]
    p = _km("train", *args)
    assert p.returncode == 0, p.stderr[-2000:]
    run_dir = tmp_path / "runs" / "smoke" / "cli"
    assert f"run: {run_dir}" in p.stdout
    assert "test/neg_elbo:" in p.stdout and "nats/image" in p.stdout and "test/nll_is4:" in p.stdout
    for kind in ("test", "test_class"):  # every protocol, on iid and on one-class test episodes
        for leaf in ("memory_conditional", "heldout", "heldout_nll_is4"):
            assert f"{kind}/{leaf}:" in p.stdout, (kind, leaf)
    ev = json.loads((run_dir / "eval.json").read_text())
    m = ev["metrics"]
    assert ev["heldout_targets"] == 2 and ev["class_episodes"] and ev["steps"] == 16 and ev["train_seconds"] > 0
    assert m["test/memory_conditional"] == pytest.approx(m["test/neg_elbo"], rel=1e-6)  # a VAE: no KL(M)
    assert m["test/heldout"] == pytest.approx(m["test/heldout_recon"] + m["test/heldout_kl"], rel=1e-5)
    logged = [r for r in read_metrics(run_dir) if r.get("test_class/heldout")]  # the loggers have them too
    assert len(logged) == 1 and float(logged[0]["test_class/heldout"]) == pytest.approx(m["test_class/heldout"])
    main(["eval", str(run_dir), "--split", "val", "--is-samples", "0"])  # kept apart from the test results
    assert json.loads((run_dir / "eval_val.json").read_text())["split"] == "val"
    assert json.loads((run_dir / "eval.json").read_text()) == ev
    main(["compare", str(run_dir), "--out", str(tmp_path / "cmp"), "--doc", str(tmp_path / "results.md")])
    doc = (tmp_path / "results.md").read_text()
    assert "memory-conditional" in doc and "held-out" in doc and f"{m['test/heldout']:.2f}" in doc
    capsys.readouterr()
    for f in ("config.yaml", "run.json", "metrics.csv", "eval.json", "checkpoints/last.ckpt"):
        assert (run_dir / f).exists(), f
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["epoch_000.png", "epoch_001.png"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run files missing"
    assert "wandb sync" in p.stderr
    assert read_meta(run_dir)["status"] == "finished"

    p = _km("eval", str(run_dir), "--is-samples", "3")
    assert p.returncode == 0, p.stderr[-2000:]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["split"] == "test" and ev["is_samples"] == 3 and ev["episodes"] == 16
    assert ev["unit"] == "nats/image" and "test/nll_is3" in ev["metrics"]
    assert ev["metrics"]["test/nll_is3"] < ev["metrics"]["test/neg_elbo"] + 1.0  # IS tightens the bound


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = Path(train(compose_config(tiny(tmp_path, "trainer.max_epochs=4", "run_id=straight")))["run_dir"])
    part = Path(train(compose_config(tiny(tmp_path, "trainer.max_epochs=2", "run_id=part")))["run_dir"])
    ov = [f"resume={part}", "trainer.max_epochs=4"]
    resumed = Path(train(compose_config(tiny(tmp_path, *ov)), ov)["run_dir"])
    assert resumed == part
    assert sorted(epoch_metrics(part, "val/neg_elbo")) == [0, 1, 2, 3]
    _assert_same_run(straight, part)


def test_sigkill_mid_epoch_then_resume_loses_nothing(tmp_path: Path) -> None:
    common = tiny(tmp_path, "trainer.max_epochs=3", "test_after_fit=false")
    straight = Path(train(compose_config([*common, "run_id=straight"]))["run_dir"])
    # 8 steps per epoch: step 13 is in the middle of the second epoch.
    p = _killed_at(13, "train", *common, "run_id=killed")
    assert p.returncode == -9, p.stderr[-2000:]
    killed = tmp_path / "runs" / "default" / "killed"
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    p = _km("train", *common, "resume=auto", "run_id=killed")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stderr
    _assert_same_run(straight, killed)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    real = VAE.episode_elbo

    def poisoned(self, x, *args, **kwargs):
        out = real(self, x, *args, **kwargs)
        if self.training and self.global_step >= 10:  # second epoch
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VAE, "episode_elbo", poisoned)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny(tmp_path, "trainer.max_epochs=3", "run_id=nan")])
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss (nan)" in err and "last good checkpoint" in err
    run_dir = tmp_path / "runs" / "default" / "nan"
    meta = read_meta(run_dir)
    assert meta["status"] == "failed" and meta["last_good_checkpoint"].endswith("last.ckpt")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    with pytest.raises(NonFiniteLossError):
        train(compose_config(tiny(tmp_path, "trainer.max_epochs=3", "run_id=nan2")))


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt("killed during checkpoint write")

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_init_from_starts_a_new_run_from_another_runs_perception_nets(tmp_path: Path, capsys) -> None:
    from km.train import build_model, init_weights_from

    src = Path(
        train(compose_config(tiny(tmp_path, "trainer.max_epochs=1", "run_id=vae", "test_after_fit=false")))["run_dir"]
    )
    vae = torch.load(src / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    km = build_model(compose_config(tiny(tmp_path, model="km")), (1, 28, 28), "bernoulli")
    fresh = {k: v.clone() for k, v in km.state_dict().items()}
    ckpt, msg = init_weights_from(km, str(src))
    assert ckpt.parent.name == "checkpoints" and "q_z -> q_z_bottom" in msg
    after = km.state_dict()
    copied = {k for k in after if k.split(".")[0] in ("encoder", "decoder", "q_z_bottom")}
    assert len(copied) > 10
    for k in copied:
        assert torch.equal(after[k], vae[k.replace("q_z_bottom", "q_z")]), k
    for k in set(after) - copied:  # memory, addressing and the top-down head keep their fresh values
        assert torch.equal(after[k], fresh[k]), k
    assert any(not torch.equal(fresh[k], after[k]) for k in copied)  # the copy changed something

    # end to end: the new run records its source; a resumed run restores its own weights instead
    ov = tiny(tmp_path, "trainer.max_epochs=1", "run_id=km", f"init_from={src}", "eval.is_samples=0", model="km")
    run = Path(train(compose_config(ov))["run_dir"])
    assert read_meta(run)["init_from"] == str(ckpt) and "initialised encoder, decoder" in capsys.readouterr().err
    train(compose_config(tiny(tmp_path, f"resume={run}", "trainer.max_epochs=2")))
    assert "initialised" not in capsys.readouterr().err


def test_vae_trains_on_plain_batches_when_memory_models_get_class_episodes(tmp_path: Path, capsys) -> None:
    # static MNIST has no training labels, so class episodes would be an error for a memory model
    run = Path(
        train(
            compose_config(
                tiny(tmp_path, "trainer.max_epochs=1", "run_id=v", "data.episodes=class", "eval.is_samples=0")
            )
        )["run_dir"]
    )
    assert "trains on iid batches" in capsys.readouterr().err
    assert "episodes: iid" in (run / "config.yaml").read_text()


def test_last_checkpoint_is_the_last_epoch_when_validation_stops_improving(tmp_path: Path) -> None:
    """The best checkpoint follows the monitored value; last.ckpt is the last epoch whatever it does. Monitoring
    val/kl, which rises from ~0 as the VAE starts to use its code, makes the first epoch the best one."""
    from km.runs import best_checkpoint

    cfg = compose_config(
        tiny(
            tmp_path,
            "trainer.max_epochs=3",
            "checkpoint.monitor=val/kl",
            "test_after_fit=false",
            "checkpoint.save_top_k=2",
            "run_id=plateau",
        )
    )
    run_dir = Path(train(cfg)["run_dir"])
    kl = epoch_metrics(run_dir, "val/kl")
    ranked = sorted(kl, key=kl.get)
    assert ranked[0] < 2, kl  # validation "worsened" after the best epoch
    files = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert files == sorted([*(f"best-epoch{e:03d}.ckpt" for e in ranked[:2]), "last.ckpt"]), files
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    # the best of the top 2 by score, not the newer file name (what km eval and test_after_fit evaluate)
    assert best_checkpoint(run_dir).name == f"best-epoch{ranked[0]:03d}.ckpt"


class _Payload:
    """Unpickling this runs code: it creates the file named in `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "km_config": {"model": {"name": "vae"}}, "x": _Payload(str(marker))}, hostile)
    for argv in (["eval", str(hostile)], ["sample", str(hostile)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: refusing checkpoint") and "\n" not in err, err
    from km.runs import RunError, load_checkpoint

    with pytest.raises(RunError, match="refusing checkpoint"):
        load_checkpoint(hostile)
    cfg = compose_config(tiny(tmp_path, f"init_from={hostile}"))
    with pytest.raises(RunError, match="init_from=.*refusing checkpoint"):
        train(cfg)
    assert not marker.exists()  # nothing in the file ran


def test_a_second_trainer_on_a_running_run_is_refused_before_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from km.runs import RunLock

    run_dir = tmp_path / "runs" / "dup" / "same"
    with RunLock(run_dir):  # a live trainer holds the run
        with pytest.raises(SystemExit) as exc:
            main(["train", *tiny(tmp_path, "name=dup", "run_id=same")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {run_dir} is being trained by another process (pid {os.getpid()}); wait for it to end "
        "or stop it, then resume"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the run was written


def test_a_copied_run_resumes_from_its_true_last_epoch(tmp_path: Path) -> None:
    import shutil

    first = Path(
        train(compose_config(tiny(tmp_path, "trainer.max_epochs=2", "test_after_fit=false", "run_id=orig")))["run_dir"]
    )
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy)
    ov = [f"resume={copy}", "trainer.max_epochs=3", "test_after_fit=false"]
    assert Path(train(compose_config(tiny(tmp_path, *ov)), ov)["run_dir"]) == copy
    assert sorted(p.name for p in (copy / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]  # no last-v1.ckpt
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert sorted(epoch_metrics(copy, "val/neg_elbo")) == [0, 1, 2]
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # the original untouched


def test_a_diverged_memory_stops_like_a_nan_loss(tmp_path: Path, monkeypatch, capsys) -> None:
    """KM's memory algebra failing (a covariance no jitter makes positive definite, here from NaN addresses in the
    second epoch) ends in the NaN stop: exit 3, epoch and step named, run.json failed, last good checkpoint kept."""
    from km.memory import NonPositiveDefiniteError, safe_cholesky
    from km.models import KanervaMachine

    with pytest.raises(NonPositiveDefiniteError, match="NaN/Inf"):  # the error the memory algebra raises
        safe_cholesky(torch.full((2, 3, 3), float("nan")))
    real = KanervaMachine._write

    def poisoned(self, e, w):
        if self.training and self.global_step >= 10:  # second epoch: the addresses blow up
            w = w * float("nan")
        return real(self, e, w)

    monkeypatch.setattr(KanervaMachine, "_write", poisoned)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny(tmp_path, "trainer.max_epochs=3", "run_id=div", model="km")])
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training stopped: non-finite or non-positive-definite memory"), err
    assert "at epoch 2 (counting from 1), step 10" in err and "Traceback" not in err
    run_dir = tmp_path / "runs" / "default" / "div"
    assert read_meta(run_dir)["status"] == "failed"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0


def test_progress_lines_give_step_loss_rate_and_eta_where_no_bar_is_drawn(capsys) -> None:
    from types import SimpleNamespace

    from km.callbacks import ProgressLines

    p = ProgressLines(interval=0.0)
    trainer = SimpleNamespace(
        global_step=0,
        is_global_zero=True,
        max_steps=-1,
        num_training_batches=10,
        max_epochs=4,
        current_epoch=0,
        callback_metrics={"train/loss_step": torch.tensor(123.456)},
        num_test_batches=[5],
    )
    p.on_train_start(trainer, None)
    for step in range(1, 4):
        trainer.global_step = step
        p.on_train_batch_end(trainer, None, None, None, step - 1)
    p.on_test_start(trainer, None)
    p.on_test_batch_end(trainer, None, None, None, 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2].startswith("step 3/40 (epoch 1/4) | loss 123.456 | ") and "/s | ETA " in lines[-2]
    assert lines[-1].startswith("test batch 2/5 | ") and "ETA" in lines[-1]
    q = ProgressLines(interval=3600.0)  # nothing more often than the interval
    q.on_train_start(trainer, None)
    q.on_train_batch_end(trainer, None, None, None, 0)
    assert capsys.readouterr().err == ""


def test_rich_bar_numbers_epochs_from_one_like_every_printed_line() -> None:
    import pytorch_lightning as pl
    from torch import nn

    from km.callbacks import RichEpochBar

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.lin(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen: list[str] = []

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, *_):
            bar = next(c for c in trainer.callbacks if isinstance(c, RichEpochBar))
            seen.append(bar.progress.tasks[bar.train_progress_bar_id].description)

    class TwoBatches:
        def __iter__(self):
            return iter([torch.zeros(2, 2), torch.ones(2, 2)])

        def __len__(self) -> int:
            return 2

    quiet_lightning()
    bar = RichEpochBar()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[bar, Look()], logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.fit(Tiny(), train_dataloaders=TwoBatches())
    assert [d.split("]")[-1].strip() for d in seen] == ["Epoch 1/2", "Epoch 1/2", "Epoch 2/2", "Epoch 2/2"]


def test_a_run_leaves_the_callers_thread_count_alone(tmp_path: Path) -> None:
    """trainer.num_threads is the run's, not the process's: a later run in the same process (a test, a notebook)
    computes with the threads it had (the thread count changes the last bits of the sums)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train(compose_config(tiny(tmp_path, "trainer.max_epochs=1", "test_after_fit=false", "trainer.num_threads=1")))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_tensorboard_logger_writes_the_same_metric_names(tmp_path: Path, monkeypatch) -> None:
    import csv
    import importlib.util

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from km.config import ConfigError

    run_dir = Path(train(compose_config(tiny(tmp_path, "trainer.max_epochs=1", "logger=tensorboard")))["run_dir"])
    tags: set[str] = set()
    for f in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    with open(run_dir / "metrics.csv") as f:
        columns = set(next(csv.reader(f))) - {"step"}
    assert columns == tags and "test/heldout" in tags and "val/neg_elbo" in tags
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        train(compose_config(tiny(tmp_path, "trainer.max_epochs=1", "logger=tensorboard", "run_id=no_tb")))
    assert not (tmp_path / "runs" / "default" / "no_tb").exists()


def test_torch_threads_puts_the_callers_count_back_whatever_the_body_set() -> None:
    from km.threads import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            torch.set_num_threads(2)  # the body changes it again (a run inside a study)
        assert torch.get_num_threads() == 3
        with torch_threads():  # None: the count is left as it is, and put back after
            torch.set_num_threads(1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
