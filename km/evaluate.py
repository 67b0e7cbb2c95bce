"""`km eval`: evaluate a run's checkpoint on the test (or val) episodes; print and save eval.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from km.callbacks import seed_all
from km.config import apply_overrides, typed
from km.runs import RunError, atomic_write_text, locate


def load_run(target: str | Path, overrides: list[str] | None = None, map_location: str = "cpu",
             dm: pl.LightningDataModule | None = None):
    """A run dir or checkpoint -> (cfg, run_dir, ckpt path, datamodule, model with weights loaded).

    `dm`: an already loaded data module of this run (saves loading the data again after training)."""
    from km.train import build_datamodule, build_model

    run_dir, ckpt = locate(target)
    try:
        state = torch.load(ckpt, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"cannot read checkpoint {ckpt}: {type(e).__name__}: {str(e)[:150]}") from None
    saved = state.get("km_config")
    if saved is None:
        if not (run_dir / "config.yaml").exists():
            raise RunError(f"{ckpt} is not a kanerva-lab checkpoint (no km_config) and {run_dir} has no config.yaml")
        saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = apply_overrides(typed(saved), overrides or [])
    dm = dm or build_datamodule(cfg)
    model = build_model(cfg, dm.image_shape, dm.likelihood)
    problem = _incompatibility(model, state.get("state_dict", {}))
    if problem:
        raise RunError(f"checkpoint {ckpt} does not match model '{cfg.model.name}' as configured: {problem}")
    model.load_state_dict(state["state_dict"])
    return cfg, run_dir, ckpt, dm, model


def _incompatibility(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """None if the state dict loads into the model, else a short description of why not."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape (e.g. {k}: checkpoint {tuple(sd[k].shape)} "
                     f"vs model {tuple(own[k].shape)})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    return "; ".join(parts) or None


def evaluate(target: str | Path, split: str = "test", is_samples: int | None = None,
             overrides: list[str] | None = None, dm: pl.LightningDataModule | None = None,
             accelerator: str = "auto") -> dict[str, Any]:
    """Test-split metrics of a run's best checkpoint; writes <run_dir>/eval.json."""
    from km.train import quiet_lightning

    quiet_lightning()
    cfg, run_dir, ckpt, dm, model = load_run(target, overrides, dm=dm)
    if is_samples is not None:
        model.is_samples = is_samples
    seed_all(cfg.seed + 424242)  # the IS estimate and sampled bound use fixed noise
    trainer = pl.Trainer(accelerator=accelerator if accelerator != "auto" else cfg.trainer.accelerator,
                         devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=sys.stderr.isatty(), use_distributed_sampler=False)
    t0 = time.time()
    if split == "test":
        metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    elif split == "val":
        metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    else:
        raise RunError(f"unknown split '{split}'; valid: test, val")
    dm.setup("test")
    result = {
        "run_dir": str(run_dir), "checkpoint": str(ckpt), "split": split,
        "model": cfg.model.name, "data": cfg.data.name, "seed": cfg.seed,
        "unit": model.lik.unit, "episode_length": cfg.data.episode_length,
        "episodes": sum(b["idx"].shape[0] for b in (dm.test_dataloader() if split == "test" else dm.val_dataloader())),
        "is_samples": model.is_samples, "eval_seed": cfg.data.eval_seed,
        "metrics": {k: float(v) for k, v in metrics.items()}, "seconds": round(time.time() - t0, 1),
    }
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['data']} ({result['split']}, {result['unit']}, "
                        f"T={result['episode_length']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(result["metrics"].items()):
        table.add_row(k, f"{v:.4f}")
    Console(stderr=False).print(table)
