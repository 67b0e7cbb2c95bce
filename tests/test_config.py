"""Typed configs: every shipped config composes; typos fail in one line listing valid keys."""

from __future__ import annotations

import subprocess
import sys

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
        ("model.lrr=1", "unknown config key 'model.lrr'; valid keys under 'model': code_dim, lr, name"),
        ("trainer.max_epoch=3", "valid keys under 'trainer': accelerator"),
        ("seeed=3", "unknown config key 'seeed'; valid keys at top level:"),
        ("model=vaee", "unknown model 'vaee'; valid options: "),
        ("data=mnistt", "unknown data 'mnistt'; valid options: cifar10, mnist, omniglot"),
        ("trainer.max_epochs=abc", "bad value for 'trainer.max_epochs'"),
        ("data.episodes=iidd", "expected one of [iid, class]"),
        ("data.batch_size=0", "bad value for 'data.batch_size': 0 (must be >= 1)"),
        ("model.lr=-1", "bad value for 'model.lr': -1.0 (must be > 0)"),
    ],
)
def test_bad_config_is_one_line_exit_2(override: str, expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["config", override])
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
