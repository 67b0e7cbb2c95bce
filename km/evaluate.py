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
from km.config import apply_overrides, to_dict, typed
from km.runs import RunError, atomic_write_text, load_checkpoint, locate, read_meta


def load_run(
    target: str | Path,
    overrides: list[str] | None = None,
    map_location: str = "cpu",
    dm: pl.LightningDataModule | None = None,
):
    """A run dir or checkpoint -> (cfg, run_dir, ckpt path, datamodule, model with weights loaded).

    `dm`: an already loaded data module of this run (saves loading the data again after training)."""
    from km.build import build_datamodule, build_model

    run_dir, ckpt = locate(target)
    state = load_checkpoint(ckpt, map_location)
    saved = state.get("km_config")
    own = run_dir / "config.yaml"
    if saved is not None and own.is_file():  # a foreign model's checkpoint placed in this run: refuse
        try:
            mine = (OmegaConf.to_container(OmegaConf.load(own)).get("model") or {}).get("name")
        except Exception:  # noqa: BLE001 - a damaged config.yaml: the checkpoint's own config decides
            mine = None
        theirs = (saved.get("model") or {}).get("name")
        if mine and theirs and mine != theirs:
            raise RunError(
                f"checkpoint {ckpt} was trained as model '{theirs}', but {run_dir} is a '{mine}' run; "
                "evaluate it from the run that made it"
            )
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
    model.checkpoint_step = int(state.get("global_step", 0))  # where the loaded weights were trained to
    model.checkpoint_epoch = int(state.get("epoch", -1))
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
        parts.append(
            f"{len(shapes)} tensors differ in shape (e.g. {k}: checkpoint {tuple(sd[k].shape)} "
            f"vs model {tuple(own[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    return "; ".join(parts) or None


OTHER_LABEL = "other: training-only terms and authors' scores (no protocol of this table, not bounds)"
PROTOCOL_LABELS = (  # (metric leaf prefix, label), printed in reverse order; README "Test protocols"
    (None, OTHER_LABEL),
    ("heldout", "held-out: targets given the context's memory (bounds ln p(x_target | X_context))"),
    ("memory_conditional", "memory-conditional: KL(M) left out (NOT a bound on ln p(X))"),
    ("", "joint: -ELBO(X) / T, every KL (bounds ln p(X) / T)"),
)


def protocol_of(metric: str) -> str:
    """'test/heldout_recon' -> the label of its protocol; names no protocol claims (ae_recon, authors_score)
    get the 'other' label, never the joint bound's."""
    from km.compare.aggregate import classify

    if classify(metric)[1] in ("other", "authors"):
        return OTHER_LABEL
    leaf = metric.split("/", 1)[-1]
    return next(label for prefix, label in PROTOCOL_LABELS if prefix is not None and leaf.startswith(prefix))


def _test_once(
    trainer: pl.Trainer, model: pl.LightningModule, dm: pl.LightningDataModule, split: str, seed: int
) -> tuple[dict[str, float], int]:
    """One pass over the split's episodes: (metrics, number of episodes)."""
    seed_all(seed)  # the IS estimates and sampled bounds use fixed noise
    metrics = (trainer.test if split == "test" else trainer.validate)(model, datamodule=dm, verbose=False)[0]
    dm.setup("test")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    return {k: float(v) for k, v in metrics.items()}, sum(b["idx"].shape[0] for b in loader)


def evaluate(
    target: str | Path,
    split: str = "test",
    is_samples: int | None = None,
    overrides: list[str] | None = None,
    dm: pl.LightningDataModule | None = None,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Metrics of a run's best checkpoint under the three protocols; writes <run_dir>/eval.json for the test
    split and <run_dir>/eval_val.json for the validation split (so a val evaluation never replaces test results).

    With `eval.class_episodes` the test split is scored a second time on class-structured episodes
    (`data.classes_per_episode` classes each, fixed by `data.eval_seed`), reported as `test_class/*`."""
    from km.build import build_datamodule, quiet_lightning

    if split not in ("test", "val"):
        raise RunError(f"unknown split '{split}'; valid: test, val")
    quiet_lightning()
    cfg, run_dir, ckpt, dm, model = load_run(target, overrides, dm=dm)
    if is_samples is not None:
        model.is_samples = is_samples
    from km.callbacks import ProgressLines

    bar = sys.stderr.isatty() and str(cfg.trainer.progress_bar) != "none"
    trainer = pl.Trainer(
        accelerator=accelerator if accelerator != "auto" else cfg.trainer.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        use_distributed_sampler=False,
        callbacks=[] if bar else [ProgressLines(cfg.trainer.progress_interval)],
    )
    t0 = time.time()
    metrics, episodes = _test_once(trainer, model, dm, split, cfg.seed + 424242)
    kinds = {split: {"episodes": episodes, "eval_episodes": str(cfg.data.eval_episodes)}}
    if split == "test" and cfg.eval.class_episodes and str(cfg.data.eval_episodes) != "class":
        class_cfg = apply_overrides(cfg, ["data.eval_episodes=class"])
        class_metrics, n = _test_once(trainer, model, build_datamodule(class_cfg), split, cfg.seed + 424242)
        metrics |= {k.replace("test/", "test_class/", 1): v for k, v in class_metrics.items()}
        kinds["test_class"] = {
            "episodes": n,
            "eval_episodes": "class",
            "classes_per_episode": cfg.data.classes_per_episode,
        }
    meta = read_meta(run_dir)
    T = cfg.data.episode_length
    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "split": split,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "unit": model.lik.unit,
        "episode_length": T,
        "episodes": episodes,
        "kinds": kinds,
        "is_samples": model.is_samples,
        "eval_seed": cfg.data.eval_seed,
        "heldout_targets": model.heldout_n(T),
        "class_episodes": "test_class" in kinds,
        "protocol": str(cfg.checkpoint.protocol),
        "kl_weights": to_dict(cfg.model.kl_weights),
        "steps": meta.get("steps"),
        "checkpoint_step": model.checkpoint_step,
        "epoch": model.checkpoint_epoch,
        "train_seconds": meta.get("train_seconds"),
        "metrics": metrics,
        "seconds": round(time.time() - t0, 1),
    }
    result["file"] = str(run_dir / ("eval.json" if split == "test" else f"eval_{split}.json"))
    atomic_write_text(Path(result["file"]), json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    """One table per episode kind, rows grouped by protocol (so no two protocols share a block)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    for kind in sorted({k.split("/", 1)[0] for k in result["metrics"]}):
        what = "one-class episodes" if kind.endswith("_class") else "iid episodes"
        table = Table(
            title=f"{result['model']} on {result['data']} ({kind}: {what}, {result['unit']}, "
            f"T={result['episode_length']}, held-out n={result.get('heldout_targets')}, "
            f"IS={result['is_samples']}, {result.get('steps', '?')} steps)"
        )
        table.add_column("protocol")
        table.add_column("metric")
        table.add_column("value", justify="right")
        names = [k for k in result["metrics"] if k.split("/", 1)[0] == kind]
        for _, label in reversed(PROTOCOL_LABELS):
            rows = sorted(k for k in names if protocol_of(k) == label)
            for i, k in enumerate(rows):
                table.add_row(label if i == 0 else "", k, f"{result['metrics'][k]:.4f}")
            if rows:
                table.add_section()
        console.print(table)
