"""Fault paths: bad input of every kind gets one line and exit 2 and loses nothing; a failure once the run
directory exists marks the run failed; the divergence advice works when followed; full disks, stale temp
files, a killed first epoch, the W&B fallback, secrets in overrides, damaged sweep state and data caches.

All in-process, on one tiny trained run shared by the module (the table of bad invocations costs about as much
as one short training run)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from km.cli import main
from km.config import compose_config
from km.models import VAE
from km.runs import read_meta, read_metrics
from km.train import train
from tests.conftest import DATA_DIR, needs_data, tiny

pytestmark = needs_data

FAST = (
    "trainer.max_epochs=1",
    "data.train_episodes_per_epoch=16",
    "data.val_episodes=8",
    "data.test_episodes=8",
    "eval.is_samples=2",
    "test_after_fit=false",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny VAE run, one epoch (its run directory is the target of the eval and resume rows)."""
    root = tmp_path_factory.mktemp("faults")
    ov = tiny(root, *FAST, "run_id=base")
    return Path(train(compose_config(ov), ov)["run_dir"])


def _bad_invocations(tmp: Path, run: Path) -> list[tuple[list[str], str]]:
    """(argv, a phrase the one-line error must contain): km train, km eval, km sample / denoise, km sweep."""
    t = lambda *extra, model="vae", data="mnist": ["train", *tiny(tmp, *FAST, *extra, model=model, data=data)]  # noqa: E731
    (tmp / "empty").mkdir(exist_ok=True)
    hostile = tmp / "hostile.ckpt"
    hostile.write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that would run a shell command
    specs = {}
    for name, params in {
        "secret": {"logger.tags": {"value": "[${oc.env:WANDB_API_KEY}]"}},
        "plus": {"+foo": {"values": [1, 2]}},
        "reserved": {"run_id": {"values": ["a"]}},
        "method": {"seed": {"values": [1]}},
    }.items():
        spec = {"method": "bogus" if name == "method" else "grid", "parameters": params}
        specs[name] = tmp / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump(spec))
    (tmp / "broken.yaml").write_text("method: grid\nparameters: [unclosed\n")
    sweep_dir = tmp / "sw_truncated"
    sweep_dir.mkdir(exist_ok=True)
    (sweep_dir / "state.json").write_text('{"version": 1, "runs": [{"name": "r0')
    good_spec = str(specs["reserved"]).replace("reserved", "good")
    Path(good_spec).write_text(yaml.safe_dump({"method": "grid", "parameters": {"seed": {"values": [1]}}}))
    return [
        # model options: ranges and typed choices
        (t("model.memory_size=-1", model="km"), "model.memory_size"),
        (t("model.sigma_xi=0", model="km"), "model.sigma_xi"),
        (t("model.write_mode=batchd", model="km"), "expected one of [batched, online]"),
        (t("model.hidden=0", model="km"), "model.hidden"),
        (t("model.kl_y_free_bits=-1", model="km"), "model.kl_y_free_bits"),
        (t("model.solver=bogus", model="dkm"), "expected one of [ridge, official]"),
        (t("model.memory_kl=bogus", model="dkm"), "expected one of [closed, steps]"),
        (t("model.sigma_w0=0", model="dkm"), "model.sigma_w0"),
        (t("model.query_noise=1.0", model="dkm"), "model.query_noise"),
        (t("model.query_reads=0", model="dkm"), "model.query_reads"),
        (t("model.query_noise=0.1", model="dkm", data="cifar10"), "unless the data are binary"),
        (t("model.query_feedback=threshold", model="dkm", data="cifar10"), "unless the data are binary"),
        (t("model.query_feedback=sample", model="dkm"), "model.query_feedback"),
        (t("model.machines=0", model="pkm"), "model.machines"),
        (t("model.memory_size=30", model="pkm"), "a multiple of model.machines"),
        (t("model.top_k=9", model="pkm"), "model.top_k"),
        (t("model.window=100", model="kpp_cpu"), "model.window"),
        (t("model.read_steps=-1", model="kpp_cpu"), "model.read_steps"),
        (t("model.lr=0"), "model.lr"),
        (t("model.lr=abc"), "model.lr"),
        (t("model.weight_decay=-1"), "model.weight_decay"),
        (t("model.optimizer=sgd"), "model.optimizer"),
        (t("model.kl_weights.memory=-1"), "model.kl_weights.memory"),
        (t("model.code_dim=0"), "model.code_dim"),
        (t("model.lrr=2"), "unknown config key 'model.lrr'"),
        (t("model=null"), "unknown model"),
        (t("model=bogus"), "unknown model"),
        # trainer
        (t("trainer.devices=0"), "trainer.devices"),
        (t("trainer.precision=bogus"), "trainer.precision"),
        (t("trainer.accelerator=tpu9"), "trainer.accelerator"),
        (t("trainer.max_steps=0"), "trainer.max_steps"),
        (t("trainer.max_epochs=0"), "trainer.max_epochs"),
        (t("trainer.gradient_clip_val=-1"), "trainer.gradient_clip_val"),
        (t("trainer.log_every_n_steps=0"), "trainer.log_every_n_steps"),
        (t("trainer.num_threads=0"), "trainer.num_threads"),
        (t("trainer.num_nodes=0"), "trainer.num_nodes"),
        (t("trainer.progress_bar=bogus"), "trainer.progress_bar"),
        # data: ranges, then sizes against the loaded splits and this machine's memory
        (t("data.test_episodes=0"), "data.test_episodes"),
        (t("data.val_episodes=0"), "data.val_episodes"),
        (t("data.batch_size=0"), "data.batch_size"),
        (t("data.episode_length=0"), "data.episode_length"),
        (t("data.val_size=0"), "data.val_size"),
        (t("data.classes_per_episode=0"), "data.classes_per_episode"),
        (t("data.episodes=bogus"), "data.episodes"),
        (t("data.image_size=30", data="omniglot"), "data.image_size"),
        (t("data.batch_size=100"), "training episodes per epoch"),
        (t("data.batch_size=1", "data.episode_length=12000"), "longer than the mnist val split"),
        (t("data.episode_length=1000000"), "GiB"),
        (t("data=bogus"), "unknown data"),
        (t(f"data.data_dir={tmp / 'empty'}"), "km data download mnist"),
        (t("data.episodes=class", model="km"), "add data.binarize=dynamic"),
        # the rest of the config; override syntax; secrets; paths
        (t("eval.heldout_targets=0"), "eval.heldout_targets"),
        (t("eval.is_samples=-1"), "eval.is_samples"),
        (t("checkpoint.protocol=bogus"), "checkpoint.protocol"),
        (t("checkpoint.save_top_k=0"), "checkpoint.save_top_k"),
        (t("logger.mode=bogus"), "logger.mode"),
        (t("net.channels=[8,8]"), "net.channels"),
        (t("net.embed_dim=0"), "net.embed_dim"),
        (t("+foo=1"), "adding or deleting config keys"),
        (t("++model.lrr=2"), "adding or deleting config keys"),
        (t("~seed"), "not of the form key=value"),
        (t("~seed=1"), "adding or deleting config keys"),
        (t("noequals"), "not of the form key=value"),
        (t("logger.tags=[${oc.env:WANDB_API_KEY}]"), "interpolations"),
        (t("model.lr=${oc.env:HOME}"), "interpolations"),
        (t("name=../outside"), "'name'"),
        (t("name=.hidden"), "'name'"),
        (t("run_id=a/b"), "'run_id'"),
        (t(f"init_from={tmp / 'nonexistent'}"), "no such run directory"),
        (t(f"init_from={run}", "net.channels=[8,8,8]"), "nets do not match"),
        (t(f"init_from={hostile}"), "refusing checkpoint"),
        # resume: what may not change, and missing runs
        (t(f"resume={tmp / 'nonexistent'}"), "cannot resume"),
        (t(f"resume={run}", "net.embed_dim=64"), "net.embed_dim cannot change"),
        (t(f"resume={run}", "data.name=omniglot"), "data.name cannot change"),
        (t(f"resume={run}", "data=omniglot"), "this run was made with data=mnist"),
        (t(f"resume={run}", "seed=5"), "seed cannot change"),
        (t(f"resume={run}", "model.code_dim=8"), "model.code_dim cannot change"),
        (t(f"resume={hostile}"), "cannot resume"),
        (t(f"runs_dir={run.parents[1]}", "run_id=base"), "already holds a run"),
        # km eval, sample, denoise
        (["eval", str(tmp / "nonexistent")], "no such run directory or checkpoint"),
        (["eval", str(run), "--is-samples", "-1"], "--is-samples -1"),
        (["eval", str(run), "--split", "bogus"], "invalid choice"),
        (["eval", str(run), "net.channels=[8,8,8]"], "does not match model 'vae'"),
        (["eval", str(run), "+foo=1"], "adding or deleting config keys"),
        (["eval", str(hostile)], "refusing checkpoint"),
        (["sample", str(run), "--episodes", "0"], "--episodes 0"),
        (["denoise", str(run), "--noise", "5"], "--noise 5"),
        (["denoise", str(run), "--iters", "-1"], "--iters -1"),
        # km sweep
        (["sweep", "start", str(tmp / "nonexistent.yaml"), "--local"], "no such sweep spec"),
        (["sweep", "start", str(specs["secret"]), "--local"], "interpolations"),
        (["sweep", "start", str(specs["plus"]), "--local"], "adding or deleting config keys"),
        (["sweep", "start", str(specs["reserved"]), "--local"], "reserved"),
        (["sweep", "start", str(specs["method"]), "--local"], "method must be grid, random or bayes"),
        (["sweep", "start", str(tmp / "broken.yaml"), "--local"], "not valid YAML"),
        (["sweep", "start", good_spec, "--local", "--set", "noequals"], "not of the form key=value"),
        (["sweep", "start", good_spec, "--local", "--set", "+foo=1"], "adding or deleting config keys"),
        (["sweep", "start", good_spec, "--local", "--set", "name=x"], "reserved"),
        (["sweep", "agent", str(tmp / "typo")], "does not exist"),
        (["sweep", "status", str(sweep_dir)], "unreadable"),
        (["sweep", "agent", str(sweep_dir)], "unreadable"),
        (["sweep", "bogus"], "invalid choice"),
    ]


def test_bad_invocations_get_one_line_and_exit_2_and_leave_nothing_running(
    tmp_path: Path, run: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a sweep directory that would be created lands here
    cases = _bad_invocations(tmp_path, run)
    assert len(cases) >= 60
    before = run.joinpath("config.yaml").read_text(), run.joinpath("checkpoints", "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
            pytest.fail(f"accepted: {argv}")
        out = capsys.readouterr()
        err = out.err.strip()
        assert exc.value.code == 2, (argv, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in out.out + out.err, (argv, err)
        assert expected in err, (argv, expected, err)
    # nothing was left marked running, no run directory was made by a refused invocation, the target run untouched
    runs = tmp_path / "runs"
    made = sorted(str(p.parent.relative_to(runs)) for p in runs.rglob("run.json")) if runs.exists() else []
    assert made == [], made
    assert not (tmp_path.parent / "outside").exists() and not list(tmp_path.rglob("sw_*-*"))
    assert (
        run.joinpath("config.yaml").read_text(),
        run.joinpath("checkpoints", "last.ckpt").stat().st_mtime_ns,
    ) == before
    assert read_meta(run)["status"] == "finished"


def test_a_failure_after_the_run_directory_exists_marks_the_run_failed(tmp_path: Path, monkeypatch, capsys) -> None:
    import km.evaluate
    from km.runs import RunError

    def broken(*args, **kwargs):
        raise RunError("the test split could not be scored (simulated)")

    monkeypatch.setattr(km.evaluate, "evaluate", broken)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny(tmp_path, *FAST, "test_after_fit=true", "run_id=late")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: the test split could not be scored (simulated)"
    meta = read_meta(tmp_path / "runs" / "default" / "late")
    assert meta["status"] == "failed" and "simulated" in meta["error"]
    assert meta["last_good_checkpoint"].endswith("last.ckpt")


def test_the_divergence_advice_works_when_followed(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run that diverges from its second epoch at its learning rate stops with exit 3 and prints a command;
    running that command (a resume with a 10x lower rate) continues from the last good epoch and finishes.
    That needs the rate given on resume to replace the one restored with the optimiser state."""
    real = VAE.episode_elbo

    def unstable_above_1e3(self, x, *args, **kwargs):
        out = real(self, x, *args, **kwargs)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.training else 0.0
        if self.training and self.current_epoch >= 1 and lr > 1e-3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VAE, "episode_elbo", unstable_above_1e3)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny(tmp_path, *FAST, "trainer.max_epochs=2", "model.lr=0.003", "run_id=nan")])
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "default" / "nan"
    assert (
        "at epoch 2 (counting from 1)" in err
        and f"km train resume={run_dir} model.lr=0.0003 trainer.gradient_clip_val=5" in err
    )
    advice = err.split("continue with: km ", 1)[1].split()
    main(advice)  # the printed command, as printed
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3e-4)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["lr"] == pytest.approx(3e-4) and saved["trainer"]["gradient_clip_val"] == 5
    assert read_meta(run_dir)["status"] == "finished"


def test_a_full_disk_ends_in_one_line_and_leaves_no_temp_files(tmp_path: Path, monkeypatch, capsys) -> None:
    """torch.save on a full disk raises a RuntimeError after writing part of the file: one line (exit 2), the
    partial temp file removed, the run marked failed; a temp file an earlier kill left is swept at the next start."""
    import km.callbacks

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )

    monkeypatch.setattr(km.callbacks.torch, "save", full_disk)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny(tmp_path, *FAST, "run_id=full")])
    monkeypatch.setattr(km.callbacks.torch, "save", real_save)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.startswith("error: cannot write checkpoint") and "MiB free" in err, err
    run_dir = tmp_path / "runs" / "default" / "full"
    assert not list(run_dir.rglob(".*.tmp-*")) and read_meta(run_dir)["status"] == "failed"

    # a kill during a write leaves a temp file (and metrics rows of an epoch that never got a checkpoint)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / ".last.ckpt.tmp-99999").write_bytes(b"\0" * 1000)
    (run_dir / ".run.json.tmp-99999").write_text("{")
    main(["train", *tiny(tmp_path, *FAST, "run_id=full", "resume=auto")])
    assert not list(run_dir.rglob(".*.tmp-*"))
    assert "removed 2 temp file(s)" in capsys.readouterr().err
    assert read_meta(run_dir)["status"] == "finished"


def test_a_run_killed_before_its_first_checkpoint_restarts_without_duplicate_rows(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "default" / "early"
    straight = Path(train(compose_config(tiny(tmp_path, *FAST, "run_id=straight")))["run_dir"])
    # the state a kill in the first epoch leaves: metrics rows flushed, no checkpoint
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text((straight / "metrics.csv").read_text())
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "pid": 99999}))
    train(compose_config(tiny(tmp_path, *FAST, "run_id=early", "resume=auto")), ["resume=auto"])
    assert read_metrics(run_dir) == read_metrics(straight)


def test_resume_changes_only_what_may_change_and_writes_config_after_the_weights_load(
    run: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    saved = (copy / "config.yaml").read_text()
    # every key in the refusal list is refused before config.yaml is touched (the table test has the messages)
    for bad in ("net.embed_dim=64", "data.name=omniglot", "seed=9"):
        with pytest.raises(ValueError):
            train(compose_config(tiny(tmp_path, *FAST, f"resume={copy}", bad)), [f"resume={copy}", bad])
        assert (copy / "config.yaml").read_text() == saved
    # weights that do not fit the saved config (a hand-edited config.yaml): refused, config.yaml untouched
    edited = saved.replace("embed_dim: 32", "embed_dim: 48")
    (copy / "config.yaml").write_text(edited)
    with pytest.raises(Exception, match="weights do not fit"):
        train(compose_config(tiny(tmp_path, f"resume={copy}")), [f"resume={copy}"])
    assert (copy / "config.yaml").read_text() == edited


def test_wandb_with_a_key_and_no_server_logs_offline_at_once(tmp_path: Path, monkeypatch) -> None:
    from km.train import make_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    cfg = compose_config(tiny(tmp_path, "logger=wandb", "run_id=w"))
    t0 = time.time()
    loggers = make_loggers(cfg, tmp_path / "w", "wid")
    try:
        wandb_logger = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
        assert wandb_logger and wandb_logger[0].experiment.settings.mode in ("offline", "dryrun")
        assert time.time() - t0 < 45  # W&B's own init timeout is 60 s; the probe takes at most 3
    finally:
        import wandb

        wandb.finish()


def test_a_distributed_worker_without_run_id_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("KM_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny(tmp_path, *FAST)])
    assert exc.value.code == 2 and "give every rank the same run_id" in capsys.readouterr().err


def test_data_check_sees_a_file_changed_in_place_with_its_mtime_restored(tmp_path: Path, monkeypatch) -> None:
    from datamodules.download import checked_split
    from datamodules.paths import cached_md5

    monkeypatch.setenv("KM_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "data.bin"
    f.write_bytes(b"a" * 1000)
    first = cached_md5(f)
    st = f.stat()
    with open(f, "r+b") as h:  # corrupted in place, same size, mtime put back
        h.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and cached_md5(f) != first
    assert cached_md5(f, fresh=True) == cached_md5(f)
    with pytest.raises(ValueError, match="content md5"):
        checked_split("test", torch.zeros(10000, 784, dtype=torch.uint8).numpy())
    assert DATA_DIR is not None
