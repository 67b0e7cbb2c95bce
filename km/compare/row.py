"""The typed row of `km compare`: one run, as `collect` / `collect_wandb` read it and `aggregate` pools it,
plus the defaults and helpers the three stages (collect, aggregate, render) share. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

MAIN_METRIC = "test/neg_elbo"
CURVE_METRIC = "val/neg_elbo"
UNIT_BY_DATA = {"cifar10": "bits/dim"}  # fallback when no eval.json says; everything else is binary
DEFAULT_UNIT = "nats/image"


def _error(msg: str) -> Exception:
    from km.runs import RunError  # stdlib-only module; mapped by km.cli to 'error: ...' + exit 2

    return RunError(msg)


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """cfg['a']['b'] for 'a.b'; also accepts flat 'a.b' / 'a/b' keys (W&B configs)."""
    for flat in (dotted, dotted.replace(".", "/")):
        if flat in cfg:
            v = cfg[flat]
            return v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v
    cur: Any = cfg
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return default
    return cur


@dataclass(kw_only=True)
class RunRow:
    """One run. Identity from config.yaml (+ run.json) or the W&B run config, test numbers from eval.json
    (or the W&B summary), curves from metrics.csv (or the W&B history). Values are as read, not validated:
    None where the run does not say. The field order is the order of summary.json's `run_rows`."""

    run_dir: str  # the run directory, or wandb:<project>/<run id>
    name: Any = None
    run_id: Any = None
    model: Any  # config model.name, else run.json / eval.json; '?' where none says
    data: Any  # likewise data.name
    seed: Any = None
    status: str  # run.json's (finished / failed / running ...), else 'unknown' ('unreadable' without a config)
    error: Any = None
    episode_length: Any = None
    split: Any = None  # eval.json's split
    unit: Any = None
    is_samples: Any = None
    episodes: Any = None
    heldout_targets: int | None = None
    class_episodes: Any = None
    experiment: Any = None  # the named experiment config (run.json choices)
    steps: float | None = None  # steps trained
    checkpoint_step: float | None = None  # the step of the evaluated checkpoint
    train_seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # finite test (or summary) numbers by name
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # {metric: [[epoch, value], ...]}
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """{field: value} in field order (shallow: metrics, curves and config are the row's own)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
