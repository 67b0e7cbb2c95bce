"""Typed run configuration: Hydra composition over structured (dataclass) schemas.

`compose_config(overrides)` composes `configs/config.yaml` with the groups
`model/ data/ trainer/ logger/ experiment/` and command-line overrides, then re-types the
result against the dataclasses below, so a typo anywhere fails fast with a one-line
`ConfigError` that lists the valid keys or options.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from km.overrides import ConfigError, split_override
from km.schema import CONFIGS, Choice, NetConfig

GROUPS = ("model", "data", "trainer", "logger", "experiment")


Episodes = Choice("Episodes", [("iid", "iid"), ("class", "class")])  # "class" is a keyword: functional API
# training episodes may also mix the two: data.class_fraction of each batch one-class, the rest iid
TrainEpisodes = Choice("TrainEpisodes", [("iid", "iid"), ("class", "class"), ("mixed", "mixed")])
Binarize = Choice("Binarize", {"static": "static", "dynamic": "dynamic"})
ProgressBar = Choice("ProgressBar", {"auto": "auto", "rich": "rich", "none": "none"})
WandbMode = Choice("WandbMode", {"online": "online", "offline": "offline", "disabled": "disabled"})
Split = Choice("Split", {"test": "test", "val": "val"})
# The three test protocols (README, "Test protocols"); checkpoint.protocol picks the validation metric of each.
Protocol = Choice("Protocol", {"joint": "joint", "memory_conditional": "memory_conditional", "heldout": "heldout"})
# Lightning's precision settings (the legacy aliases 32 / 16 / bf16 are not accepted: one spelling each)
Precision = Choice(
    "Precision", {v: v for v in ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")}
)
PROTOCOL_MONITOR = {"joint": "val/neg_elbo", "memory_conditional": "val/memory_conditional", "heldout": "val/heldout"}


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | omniglot | cifar10
    data_dir: str | None = None  # None: KM_DATA_DIR, then ../shared/data
    episode_length: int = 32  # T
    batch_size: int = 16  # B episodes per batch
    episodes: TrainEpisodes = TrainEpisodes.iid  # iid | class | mixed (training episodes)
    classes_per_episode: int = 4
    class_fraction: float = 0.5  # episodes=mixed: this fraction of each batch's episodes is class episodes
    eval_episodes: Episodes = Episodes.iid  # test episodes: iid | class (classes_per_episode each); val stays iid
    train_episodes_per_epoch: int | None = None  # None: the whole training split
    val_episodes: int | None = None  # None: every full episode of the split
    test_episodes: int | None = None
    val_size: int | None = None  # None: the data set's default
    binarize: Binarize = Binarize.static  # static | dynamic (training only)
    image_size: int = 28  # omniglot: 28 or 32
    eval_seed: int = 0  # order of val/test episodes: the same for every model and run


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Precision = Precision("32-true")  # 32-true | 64-true | bf16-mixed | 16-mixed | bf16-true | 16-true
    max_epochs: int = 10
    max_steps: int = -1
    gradient_clip_val: float | None = None
    limit_val_batches: float | None = None
    num_sanity_val_steps: int = 1
    log_every_n_steps: int = 10
    deterministic: bool = False
    progress_bar: ProgressBar = (
        ProgressBar.auto
    )  # auto (rich on a terminal, one line per epoch otherwise) | rich | none
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    progress_interval: float = 30.0  # seconds between progress lines when no bar is drawn (log files, batch jobs)
    compile: bool = False  # torch.compile of the model's training and evaluation step (km/compiling.py)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: the suite's cheap CPU check)


@dataclass
class LoggerConfig:
    wandb: bool = True
    tensorboard: bool = False  # also Lightning's TensorBoard logger: <run_dir>/tensorboard/ (same metric names)
    project: str = "kanerva-lab"
    entity: str | None = None
    mode: WandbMode | None = None  # online | offline | disabled; None: WANDB_MODE, else online iff logged in
    tags: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    # The best checkpoint is the one with the lowest validation value of this protocol's quantity: it must
    # follow the training objective (with the memory KL weighted 0 the joint bound rises while the model improves).
    protocol: Protocol = Protocol.joint  # joint | memory_conditional | heldout
    monitor: str | None = None  # None: the protocol's metric (PROTOCOL_MONITOR); else any logged val/ metric
    save_top_k: int = 1
    every_n_epochs: int = 1

    def monitored(self) -> str:
        return self.monitor or PROTOCOL_MONITOR[str(self.protocol)]


@dataclass
class EvalConfig:
    is_samples: int = 100  # importance samples of the test NLL estimates (joint and held-out; 0: skip them)
    split: Split = Split.test
    heldout_targets: int | None = None  # n targets scored given the first T - n items; None: T // 4 (at least 1)
    class_episodes: bool = (
        False  # also score class-structured test episodes (data.classes_per_episode classes each): test_class/*
    )


@dataclass
class Config:
    model: Any = None  # a model's dataclass, chosen by model.name (see km.schema.MODELS)
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "default"  # experiment name: runs go to <runs_dir>/<name>/<run_id>/
    run_id: str | None = None  # None: a fresh time-stamped id
    runs_dir: str = "runs"
    seed: int = 0
    resume: str | None = None  # run dir | checkpoint | auto
    init_from: str | None = None  # a new run starts its encoder, decoder and z head from this run dir | checkpoint
    test_after_fit: bool = True


def config_dir() -> Path:
    """The `configs/` folder: KM_CONFIG_DIR, else the one beside the `km` package."""
    env = os.environ.get("KM_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def _keys(node: Any) -> list[str]:
    if is_dataclass(node):
        return [f.name for f in fields(node)]
    return sorted(node.keys()) if isinstance(node, (dict, DictConfig)) else []


def typed(cfg: DictConfig | dict) -> DictConfig:
    """Merge a plain config into the schemas; unknown keys and bad types raise ConfigError."""
    plain = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    model_name = OmegaConf.select(plain, "model.name", default=None)
    if model_name not in CONFIGS:
        raise ConfigError(f"unknown model '{model_name}'; valid models: {', '.join(sorted(CONFIGS))}")
    schema = OmegaConf.structured(Config)
    schema.model = OmegaConf.structured(CONFIGS[model_name])
    try:
        merged = OmegaConf.merge(schema, plain)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, schema)) from None
    OmegaConf.set_struct(merged, True)
    _check_ranges(merged)
    return merged


ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
# a run's name and id are directory names under runs_dir: no separators, no leading dot (no "..")
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")
MAX_NAME = 100  # a directory name (file systems take 255 bytes; a run dir's files add their own names)
_PLAIN = (
    f"a plain directory name of at most {MAX_NAME} characters: letters, digits and _ . = + - (no '/', no leading '.')"
)


def _devices_ok(v: Any) -> bool:
    """Lightning's `devices`: a count >= 1, -1 (all), "auto", a list of indices or "0,1"."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 1 or v == -1
    if isinstance(v, str):
        return v == "auto" or re.fullmatch(r"-1|[1-9]\d*|\d+(,\d+)+,?|\d+,", v.strip()) is not None
    return bool(v) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


# key -> (test, what it must be); values a type check cannot catch. Model options: each model's `check()`.
RANGES = {
    "data.episode_length": (lambda v: v >= 1, ">= 1"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.classes_per_episode": (lambda v: v >= 1, ">= 1"),
    "data.class_fraction": (
        lambda v: 0 <= v <= 1,
        "in [0, 1]: the fraction of each batch's episodes that are class episodes",
    ),
    "net.embed_dim": (lambda v: v >= 1, ">= 1"),
    "net.channels": (lambda v: len(v) == 3 and min(v) >= 1, "3 positive filter counts"),
    "eval.is_samples": (lambda v: v >= 0, ">= 0"),
    "data.train_episodes_per_epoch": (lambda v: v >= 1, ">= 1 (or null: the whole training split)"),
    "data.val_episodes": (lambda v: v >= 1, ">= 1 (or null: every full episode of the split)"),
    "data.test_episodes": (lambda v: v >= 1, ">= 1 (or null: every full episode of the split)"),
    "data.val_size": (lambda v: v >= 1, ">= 1 (or null: the data set's default)"),
    "data.image_size": (lambda v: v in (28, 32), "28 or 32"),
    "trainer.max_epochs": (lambda v: v >= 1 or v == -1, ">= 1 (or -1: no limit)"),
    "trainer.max_steps": (lambda v: v >= 1 or v == -1, ">= 1 (or -1: no limit)"),
    "trainer.devices": (_devices_ok, "a device count >= 1, -1 (all), auto, or a list of device indices"),
    "trainer.accelerator": (lambda v: v in ACCELERATORS, "one of " + ", ".join(ACCELERATORS)),
    "trainer.num_nodes": (lambda v: v >= 1, ">= 1"),
    "trainer.gradient_clip_val": (lambda v: v > 0, "> 0 (or null: no clipping)"),
    "trainer.limit_val_batches": (lambda v: v > 0, "> 0: a fraction (<= 1.0) or a count of batches"),
    "trainer.num_sanity_val_steps": (lambda v: v >= -1, ">= 0 (or -1: all)"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, ">= 1"),
    "trainer.num_threads": (lambda v: v >= 1, ">= 1 (or null: torch's default)"),
    "trainer.progress_interval": (lambda v: v > 0, "> 0 seconds"),
    "checkpoint.save_top_k": (lambda v: v >= 1 or v == -1, ">= 1 (or -1: every epoch)"),
    "checkpoint.every_n_epochs": (lambda v: v >= 1, ">= 1"),
    "name": (lambda v: len(str(v)) <= MAX_NAME and SAFE_NAME.fullmatch(str(v)) is not None, _PLAIN),
    "run_id": (lambda v: len(str(v)) <= MAX_NAME and SAFE_NAME.fullmatch(str(v)) is not None, _PLAIN),
}


def _non_finite(node: Any, prefix: str = "") -> tuple[str, float] | None:
    """The first key holding a NaN or infinite number (nothing of the platform means inf: a loss weight, a
    rate, a noise scale or a limit of inf only diverges or fails later, with advice that cannot help)."""
    import math

    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, float) and not math.isfinite(v):
            return key, v
        if isinstance(v, dict | list):
            found = _non_finite(v, key)
            if found:
                return found
    return None


def _check_ranges(cfg: DictConfig) -> None:
    bad = _non_finite(OmegaConf.to_container(cfg, resolve=True))
    if bad:
        raise ConfigError(f"bad value for '{bad[0]}': {bad[1]} (must be a finite number)")
    for key, (ok, what) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):  # None: the option's "all" / "none" / default meaning
            raise ConfigError(f"bad value for '{key}': {value} (must be {what})")
    try:
        OmegaConf.to_object(cfg.model).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_precision_supported(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    n, T = cfg.eval.heldout_targets, cfg.data.episode_length
    if n is not None and not 1 <= n <= T - 1:
        raise ConfigError(
            f"bad value for 'eval.heldout_targets': {n} (must be in [1, T - 1] = [1, {T - 1}] "
            f"for data.episode_length={T}, or null for T // 4)"
        )


def check_precision_supported(precision: str, accelerator: str) -> None:
    """bf16 on a CUDA device that has none (before Ampere) is a ConfigError, not a traceback mid-run. CPU
    autocast supports bf16 (slowly; for testing), and 'auto' / 'gpu' resolve to CUDA when one is visible."""
    if not precision.startswith("bf16") or accelerator == "cpu":
        return
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision={precision} needs bfloat16, which {torch.cuda.get_device_name()} "
            "does not support; use trainer.precision=16-mixed or 32-true"
        )


def _explain(e: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = ", ".join(_keys(node))
        where = f"under '{parent}'" if parent else "at top level"
        return f"unknown config key '{key}'; valid keys {where}: {valid}{_hint(key)}"
    return f"bad value for '{key}': {msg}" if key else msg


# keys users reach for that the platform decides from something else: the reason, after the valid keys
_CHANNELS_HINT = "the image channels follow from the data set (1 for mnist and omniglot, 3 for cifar10)"
KEY_HINTS = {
    "likelihood": "the likelihood follows from the data set (Bernoulli for the binary mnist and omniglot, "
    "discretised logistic for 8-bit colour cifar10); it is not an option",
    "in_channels": _CHANNELS_HINT,
    "channels_in": _CHANNELS_HINT,
}


def _hint(key: str) -> str:
    hint = KEY_HINTS.get(key.rsplit(".", 1)[-1])
    return f" ({hint})" if hint else ""


def _group_options(group: str) -> list[str]:
    d = config_dir() / group
    return sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")) if d.is_dir() else []


def _precheck(overrides: list[str]) -> None:
    """Catch the common mistakes before Hydra, with a message naming the valid choices."""
    for ov in overrides:
        key, value = split_override(ov)
        if key in GROUPS:
            opts = _group_options(key)
            if value not in opts and not (key == "experiment" and value == "null"):
                raise ConfigError(f"unknown {key} '{value}'; valid options: {', '.join(opts)}")


def register_schemas() -> None:
    """Put the dataclasses into Hydra's ConfigStore: `config_schema` for the primary config and
    `<model>_schema` in group `model`, which the yaml files list first in their defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, cfg_cls in CONFIGS.items():
        cs.store(group="model", name=f"{name}_schema", node=cfg_cls)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose configs/config.yaml with overrides (Hydra syntax) and type-check the result."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    _precheck(overrides)
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_message(e, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    return typed(cfg)


def _hydra_message(e: Exception, overrides: list[str]) -> str:
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        base = compose_config([o for o in overrides if split_override(o)[0] in GROUPS])
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        if isinstance(node, DictConfig):
            where = f"under '{parent}'" if parent else "at top level"
            return f"unknown config key '{key}'; valid keys {where}: {', '.join(_keys(node))}{_hint(key)}"
    if "LexerNoViableAlt" in text or "LexerNoViableAlt" in type(e.__cause__ or e).__name__:
        odd = [o for o in overrides if not o.isascii()]
        what = f"'{odd[0]}'" if odd else "an override"
        return (
            f"cannot parse {what}: Hydra's override grammar takes ASCII only outside quotes; quote the value "
            "(key='value'), and keep name and run_id to plain ASCII directory names"
        )
    cause = e.__cause__ or e
    key = re.search(r"full_key: (\S+)", str(cause))
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else text
    return f"bad value for '{key.group(1)}': {first}" if key else first


def group_choices(overrides: list[str]) -> dict[str, str]:
    """The config-group choices among overrides, e.g. {"model": "km", "data": "mnist"}."""
    pairs = (split_override(o) for o in overrides)
    return {k: v for k, v in pairs if k in GROUPS}


def apply_overrides(cfg: DictConfig, overrides: list[str], choices: dict[str, str] | None = None) -> DictConfig:
    """Apply dotted key=value overrides to an existing (e.g. saved) config, type-checked.

    Group choices (model=..., data=...) cannot change a saved config: one equal to the saved
    choice (`choices`, or the model/data name) is accepted as a no-op, any other is an error.
    """
    saved = {"model": cfg.model.name, "data": cfg.data.name, **(choices or {})}
    dotted = []
    for ov in overrides:
        key, value = split_override(ov)
        if key in GROUPS:
            if saved.get(key) != value:
                raise ConfigError(
                    f"'{ov}': this run was made with {key}={saved.get(key, 'its default')}; "
                    "start a new run to change it"
                )
            continue
        dotted.append(ov)
    overrides = dotted
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, cfg)) from None
    return merged


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain resolved dict (enums as their strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
