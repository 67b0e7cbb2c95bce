"""Typed configs: every shipped config composes; typos fail in one line listing valid keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from km.cli import main
from km.config import ConfigError, _group_options, compose_config


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "experiment"])
def test_every_shipped_option_composes(group: str) -> None:
    for opt in _group_options(group):
        cfg = compose_config([f"{group}={opt}"])
        assert cfg.model.name and cfg.data.name


def test_overrides_are_applied_and_typed() -> None:
    cfg = compose_config(["trainer.max_epochs=5", "seed=1", "data.train_episodes_per_epoch=7", "model.lr=0.01"])
    assert (cfg.trainer.max_epochs, cfg.seed, cfg.data.train_episodes_per_epoch, cfg.model.lr) == (5, 1, 7, 0.01)


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "model.lrr=1",
            "unknown config key 'model.lrr'; valid keys under 'model': code_dim, heldout_loss, kl_weights, lr, name, "
            "optimizer, weight_decay",
        ),
        ("trainer.max_epoch=3", "valid keys under 'trainer': accelerator"),
        ("seeed=3", "unknown config key 'seeed'; valid keys at top level:"),
        (
            "data=cifar10 data.likelihood=bernoulli",
            "(the likelihood follows from the data set (Bernoulli for the binary",
        ),
        (
            "data=omniglot model.likelihood=logistic",
            "discretised logistic for 8-bit colour cifar10); it is not an option)",
        ),
        ("data=cifar10 net.in_channels=1", "(the image channels follow from the data set (1 for mnist and omniglot"),
        ("model=vaee", "unknown model 'vaee'; valid options: "),
        ("data=mnistt", "unknown data 'mnistt'; valid options: cifar10, mnist, omniglot"),
        ("trainer.max_epochs=abc", "bad value for 'trainer.max_epochs'"),
        ("data.episodes=iidd", "expected one of [iid, class, mixed]"),
        ("data.batch_size=0", "bad value for 'data.batch_size': 0 (must be >= 1)"),
        ("model.lr=-1", "bad value for 'model.lr': -1.0 (must be > 0)"),
        ("eval.heldout_targets=0", "bad value for 'eval.heldout_targets': 0 (must be in [1, T - 1] = [1, 31]"),
        ("eval.heldout_targets=32", "bad value for 'eval.heldout_targets': 32 (must be in [1, T - 1] = [1, 31]"),
        (
            "checkpoint.protocol=jointt",
            "bad value for 'checkpoint.protocol': Invalid value 'jointt', expected one of "
            "[joint, memory_conditional, heldout]",
        ),
        (
            "model.optimizer=sgd",
            "bad value for 'model.optimizer': Invalid value 'sgd', expected one of [adam, rmsprop]",
        ),
        ("model.kl_weights.memory=-0.5", "bad value for 'model.kl_weights.memory': -0.5 (must be >= 0)"),
        ("model.kl_weights.addressing=-1", "bad value for 'model.kl_weights.addressing': -1.0 (must be >= 0)"),
        ("model.kl_weights.warmup_steps=-3", "bad value for 'model.kl_weights.warmup_steps': -3 (must be >= 0)"),
        (
            "model.kl_weights.memoryy=0",
            "unknown config key 'model.kl_weights.memoryy'; valid keys under "
            "'model.kl_weights': addressing, memory, warmup_steps, z",
        ),
        (
            "model=km model.memory_dtype=float16",
            "bad value for 'model.memory_dtype': Invalid value 'float16', expected one of [float32, float64]",
        ),
        (
            "trainer.precision=bf16",
            "bad value for 'trainer.precision': Invalid value 'bf16', expected one of "
            "[32-true, 64-true, bf16-mixed, 16-mixed, bf16-true, 16-true]",
        ),
    ],
)
def test_bad_config_is_one_line_exit_2(override: str, expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["config", *override.split()])  # space-separated: several overrides
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err


def test_unknown_key_via_real_process_has_exit_code_2() -> None:
    p = subprocess.run([sys.executable, "-m", "km.cli", "train", "model.lrr=1"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]  # exactly one line
    assert "valid keys under 'model'" in p.stderr


def test_yaml_typo_is_caught(tmp_path, monkeypatch) -> None:
    import shutil

    from km.config import config_dir

    d = tmp_path / "configs"
    shutil.copytree(config_dir(), d)
    (d / "model" / "vae.yaml").write_text((d / "model" / "vae.yaml").read_text() + "code_dimm: 3\n")
    monkeypatch.setenv("KM_CONFIG_DIR", str(d))
    with pytest.raises(ConfigError, match="code_dimm"):
        compose_config([])


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*_*.yaml"))


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith(("paper_", "cpu_"))])
def test_paper_and_cpu_experiment_configs_compose_with_their_papers_objectives(name: str) -> None:
    cfg = compose_config([f"experiment={name}"])
    assert cfg.name == name
    model = name.split("_")[1]
    assert cfg.model.name == model
    assert cfg.eval.class_episodes and cfg.data.classes_per_episode == 1
    if model == "kpp" and "fullkl" not in name and "adam" not in name:  # the authors': memory KL off, RMSprop, clip
        assert cfg.model.kl_weights.memory == 0 and str(cfg.model.optimizer) == "rmsprop"
        assert cfg.trainer.gradient_clip_val and str(cfg.checkpoint.protocol) == "memory_conditional"
    elif model == "gpm" and name.startswith("paper_"):  # the authors': memory KL off, mean reads, AE term, clip 10
        assert cfg.model.kl_weights.memory == 0 and not cfg.model.sample_memory and cfg.model.ae_weight == 1
        assert cfg.trainer.gradient_clip_val == 10 and str(cfg.checkpoint.protocol) == "memory_conditional"
        assert cfg.model.pinv_steps == 7 and str(cfg.model.pinv_init) == "official"
    else:
        assert cfg.model.kl_weights.memory == 1 and str(cfg.checkpoint.protocol) == "joint"
    if "adam" in name:  # K++ on the optimiser of every other cpu_* config
        assert str(cfg.model.optimizer) == "adam" and cfg.trainer.gradient_clip_val is None
    if model == "dkm":  # the official code trains on means
        assert cfg.model.sample is ("sampled" in name)
    if name.startswith("cpu_"):
        assert cfg.trainer.num_threads == 1 and cfg.trainer.accelerator == "cpu"
    else:
        assert cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["eval", "RUN", "--is-samples", "-1"],
            "error: --is-samples -1: the number of importance samples must be >= 0",
        ),
        (["sample", "RUN", "--episodes", "0"], "error: --episodes 0: the number of test episodes must be >= 1"),
        (["denoise", "RUN", "--episodes", "0"], "error: --episodes 0: the number of test episodes must be >= 1"),
        (["denoise", "RUN", "--iters", "-1"], "error: --iters -1: the number of iterations must be >= 1"),
        (["sample", "RUN", "--iters", "0"], "error: --iters 0: the number of iterations must be >= 1"),
        (
            ["denoise", "RUN", "--noise", "5"],
            "error: --noise 5.0: a pixel flip probability (binary data) or noise std must be in [0, 1]",
        ),
    ],
)
def test_bad_command_options_are_one_line_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)  # checked before the (nonexistent) run is looked at
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == expected


def test_commands_that_do_not_train_import_neither_torch_nor_lightning(tmp_path: Path) -> None:
    """`km --help`, `km config`, `km data check`, `km sweep start/status`, `km compare`: one fresh interpreter
    runs them all and then must hold neither torch nor Lightning (their start-up: bench/startup.py)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    spec, sw = root / "sweeps" / "compare_baselines.yaml", tmp_path / "sw"
    runs = [
        ["--help"],
        ["config", "model=km"],
        ["config", "model=dkm", "model.solver=official"],
        ["data", "check", "mnist"],
        ["sweep", "start", str(spec), "--local", "--dir", str(sw)],
        ["sweep", "status", str(sw)],
        ["compare", str(tmp_path / "none")],
        ["train", "model.lrr=1"],
    ]
    probe = (
        f"import sys\nfrom km.cli import main\nfor argv in {runs!r}:\n    try:\n        main(argv)\n"
        "    except SystemExit:\n        pass\nheavy = {'torch', 'pytorch_lightning', 'lightning_fabric'} & set(sys.modules)\n"
        "print('IMPORTED', sorted(heavy), file=sys.stderr)"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=300)
    assert p.stderr.strip().splitlines()[-1] == "IMPORTED []", p.stderr[-2000:]
    assert "model:" in p.stdout and (sw / "state.json").exists()


def test_dkm_solver_choices_are_the_memory_solvers() -> None:
    from km.memory.dynamic import SOLVERS
    from km.schema import Solver

    assert sorted(s.value for s in Solver) == sorted(SOLVERS)


def test_a_resumed_run_checks_options_against_its_own_model(tmp_path: Path) -> None:
    """`km train resume=<dkm run> model.query_noise=...` composes with the run's groups (run.json choices), so a
    DKM option is judged as a DKM option (then refused as a change by train), not as unknown to the default VAE."""
    import json

    from km.cli import _saved_choices

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"choices": {"model": "dkm", "data": "mnist"}}))
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")
    assert _saved_choices([f"resume={run}", "model.query_noise=0.3"]) == ["model=dkm", "data=mnist"]
    assert _saved_choices([f"resume={ckpt}", "data=omniglot"]) == ["model=dkm"]  # the command line wins
    assert _saved_choices(["resume=auto"]) == [] and _saved_choices(["model=km"]) == []
    cfg = compose_config([*_saved_choices([f"resume={run}"]), f"resume={run}", "model.query_noise=0.3"])
    assert cfg.model.name == "dkm" and cfg.model.query_noise == 0.3


@pytest.mark.parametrize(
    "recipe, base, overrides",
    [
        (
            "fewshot_km_omniglot",
            "cpu_km_omniglot",
            ["data.episodes=class", "model.code_dim=32", "trainer.max_epochs=30"],
        ),
        ("fewshot_vae_omniglot", "cpu_vae_omniglot", ["model.code_dim=32", "trainer.max_epochs=30"]),
    ],
)
def test_the_fewshot_recipes_are_the_override_runs_they_name(recipe: str, base: str, overrides: list[str]) -> None:
    """The named recipe trains exactly what the committed runs (docs/results/run_files/ablation1200_cpu) trained
    with the overrides written out, the name aside."""
    from omegaconf import OmegaConf

    a = OmegaConf.to_container(compose_config([f"experiment={recipe}"]))
    b = OmegaConf.to_container(compose_config([f"experiment={base}", *overrides]))
    assert a.pop("name") == recipe and b.pop("name") == base
    assert a == b
