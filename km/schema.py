"""The typed schemas of every option, and the model registry: standard library only.

`km.config` types a composed config against these dataclasses, so `km config`, `km sweep` and the other
commands that do not train never import torch or Lightning (measured: bench/startup.py). A model is registered
once, in `MODELS` below: its name, the dotted path of its LightningModule and its config dataclass (plus its
`configs/model/<name>.yaml`). The modules in `km/models/` import their config classes from here.

Each config's `check()` holds the ranges a type cannot express; it runs when a config is composed, before any
run directory exists, and raises ValueError with one line: the key, its value and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """String options checked at config time (str mixin: members compare equal to their strings), so a typo
    in any of them is a one-line config error naming the valid values, never a traceback mid-run."""

    def __str__(self) -> str:
        return self.value


class Optimizer(Choice):
    adam = "adam"  # torch.optim.Adam (KM paper)
    rmsprop = "rmsprop"  # torch.optim.RMSprop (the K++ authors' runs, with gradient clip 5)


WriteMode = Choice("WriteMode", {"batched": "batched", "online": "online"})  # same posterior; batched is faster


def need(ok: bool, key: str, value: Any, what: str) -> None:
    """A model option's range check (`ModelConfig.check`): ValueError with the key, its value and the rule."""
    if not ok:
        raise ValueError(f"bad value for 'model.{key}': {value} (must be {what})")


class MemoryDtype(Choice):
    """dtype of the K x K memory algebra (writes, KLs, the sampling factor, DKM's address solves)."""

    float32 = "float32"  # the model's own dtype (never below float32: autocast is off inside the algebra)
    float64 = "float64"  # float64 inside a float32 model (cost: bench/memory.py --section memory_dtype)

    @property
    def torch_dtype(self) -> Any:
        """The ``algebra_dtype`` of ``KanervaMemory``: None (the model's) or torch.float64."""
        import torch

        return torch.float64 if self is MemoryDtype.float64 else None


@dataclass
class KLWeights:
    """Weights of the KL terms in the training loss only; every reported quantity keeps each KL in full.

    The effective weight at optimiser step s is `weight * min(1, (s + 1) / warmup_steps)` (linear warm-up;
    0 steps: the weight from the start)."""

    memory: float = 1.0  # KL(q(M | X) || p(M)) (the K++ authors ran 0)
    z: float = 1.0  # KL of the per-item code z (KM, PKM, K++; DKM has no z)
    addressing: float = 1.0  # KL of the addressing latents: y and machine weights c (KM, PKM), w (DKM), keys Y (K++)
    warmup_steps: int = 0


# EpisodeOutput.parts name -> KLWeights field
KL_GROUPS = {
    "kl_M": "memory",
    "kl_z": "z",
    "kl_y": "addressing",
    "kl_c": "addressing",
    "kl_w": "addressing",
    "kl_Y": "addressing",
}


@dataclass
class ModelConfig:
    """Fields every model has. Each model extends it with its own."""

    name: str = "?"
    lr: float = 1e-4
    weight_decay: float = 0.0
    code_dim: int = 64  # C: size of the latent code z that the decoder reads
    optimizer: Optimizer = Optimizer.adam
    kl_weights: KLWeights = field(default_factory=KLWeights)
    # Training loss only: + heldout_loss x the held-out bound of each training episode (memory written from the
    # first T - n items, the n = eval.heldout_targets (T // 4) targets scored with every KL of their own), the
    # few-shot objective trained directly; 0: the joint bound alone. Memoryless models (the VAE) ignore it.
    heldout_loss: float = 0.0

    def check(self) -> None:
        """Ranges a type cannot express, checked when the config is composed (before any run directory
        exists); each model adds its own. Raises ValueError (one line: the key, its value, the rule)."""
        for f in fields(self):  # choices: OmegaConf checks them when composing; a config built in code gets it here
            if isinstance(f.default, Choice):
                valid = [str(c) for c in type(f.default)]
                need(str(getattr(self, f.name)) in valid, f.name, getattr(self, f.name), "one of " + ", ".join(valid))
        need(self.lr > 0, "lr", self.lr, "> 0")
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        need(self.code_dim >= 1, "code_dim", self.code_dim, ">= 1")
        need(self.heldout_loss >= 0, "heldout_loss", self.heldout_loss, ">= 0")
        for k in ("memory", "z", "addressing", "warmup_steps"):
            v = getattr(self.kl_weights, k)
            need(v >= 0, f"kl_weights.{k}", v, ">= 0")


@dataclass
class NetConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # filters of the 3 blocks
    embed_dim: int = 256  # size of the encoder output e(x)
    channels_last: bool = False  # NHWC conv activations and weights (faster on CPU: module doc; opt-in)


@dataclass
class VAEConfig(ModelConfig):
    name: str = "vae"
    lr: float = 1e-3
    code_dim: int = 100


@dataclass
class KMConfig(ModelConfig):
    name: str = "km"
    lr: float = 1e-3
    code_dim: int = 100  # C: code size = memory width
    memory_size: int = 64  # K slots
    y_dim: int = 16  # d_y: addressing latent
    addr_dim: int = 64  # S: size of b = f(y), the address-space
    hidden: int = 256  # width of f and of the q(z | x, y, M) network
    sigma_xi: float = 1.0  # observation noise of memory reads/writes (initial value if learned)
    learn_sigma_xi: bool = True
    write_mode: WriteMode = WriteMode.batched  # batched | online: same posterior, batched is the fast one
    memory_dtype: MemoryDtype = MemoryDtype.float32  # float32 | float64: dtype of the K x K memory algebra
    sample_memory: bool = False  # False: exact expectation over q(M|X) (default); True: one M ~ q(M|X)
    kl_y_free_bits: float = 0.0  # training loss only: KL(q(y)||p(y)) counted as max(KL, this) per dimension
    start_as_vae: bool = True  # init q(y) = p(y) and small addresses, so step 0 scores like the VAE it extends

    def check(self) -> None:
        super().check()
        for k in ("memory_size", "y_dim", "addr_dim", "hidden"):
            need(getattr(self, k) >= 1, k, getattr(self, k), ">= 1")
        need(self.sigma_xi > 0, "sigma_xi", self.sigma_xi, "> 0: the observation noise of the memory")
        need(self.kl_y_free_bits >= 0, "kl_y_free_bits", self.kl_y_free_bits, ">= 0")


@dataclass
class PKMConfig(KMConfig):
    name: str = "pkm"
    memory_size: int = 64  # K: total slots, split evenly among the machines (K_p = K / P)
    machines: int = 4  # P
    top_k: int = 0  # 0: soft weights over all machines; k: only the k largest per item (sparse)

    def check(self) -> None:
        super().check()
        need(self.machines >= 1, "machines", self.machines, ">= 1")
        need(
            self.memory_size % self.machines == 0,
            "memory_size",
            self.memory_size,
            f"a multiple of model.machines = {self.machines}: each machine gets memory_size / machines slots",
        )
        need(0 <= self.top_k <= self.machines, "top_k", self.top_k, f"in [0, model.machines = {self.machines}]")


Solver = Choice("Solver", {"ridge": "ridge", "official": "official"})  # km.memory.dynamic.SOLVERS
MemoryKL = Choice("MemoryKL", {"closed": "closed", "steps": "steps"})
QueryFeedback = Choice("QueryFeedback", {"mean": "mean", "threshold": "threshold"})


@dataclass
class DKMConfig(ModelConfig):
    name: str = "dkm"
    lr: float = 1e-3
    code_dim: int = 100  # C: embedding size = memory width
    memory_size: int = 32  # K slots (official Omniglot setting)
    sigma_xi: float = 1.0  # observation noise of writes; lam = sigma_xi^2 / sigma_w0^2
    learn_sigma_xi: bool = False
    sigma_w0: float = 1.0  # prior std of the addressing weights
    sigma_w_init: float = 0.3  # initial posterior std of w (learned)
    solver: Solver = Solver.ridge  # ridge | official (least squares on M M^T, see km.memory.dynamic)
    write_mode: WriteMode = WriteMode.batched  # batched | online: same posterior
    memory_dtype: MemoryDtype = MemoryDtype.float32  # float32 | float64: dtype of the K x K memory algebra
    memory_kl: MemoryKL = MemoryKL.closed  # training loss: closed (matrix-normal KL) | steps (sum of per-step KLs)
    sample: bool = True  # training loss samples w and M; false: means (reported bounds always sample)
    ae_weight: float = 1.0  # weight of the autoencoder term in the training loss (not in the bound)
    query_noise: float = 0.0  # training only: fraction of each read query's pixels flipped (binary data; target clean)
    query_reads: int = 1  # training only: reads unrolled, each from the last read's mean image; the loss averages them
    query_feedback: QueryFeedback = QueryFeedback.mean  # unrolled reads fed: mean image | threshold (0.5, no grad)

    def check(self) -> None:
        super().check()
        need(self.memory_size >= 1, "memory_size", self.memory_size, ">= 1")
        for k in ("sigma_xi", "sigma_w0", "sigma_w_init"):
            need(getattr(self, k) > 0, k, getattr(self, k), "> 0: a standard deviation")
        need(self.ae_weight >= 0, "ae_weight", self.ae_weight, ">= 0")
        need(0 <= self.query_noise < 1, "query_noise", self.query_noise, "in [0, 1): a fraction of pixels flipped")
        need(1 <= self.query_reads <= 8, "query_reads", self.query_reads, "in [1, 8]: reads unrolled in training")


@dataclass
class KPPConfig(ModelConfig):
    name: str = "kpp"
    lr: float = 1e-3
    code_dim: int = 100  # C: size of z
    mem_channels: int = 8  # C_m
    mem_size: int = 16  # S: the memory is S x S cells (8, 16, 32, ...)
    window: int = 8  # w: each read cuts a w x w window
    read_steps: int = 3  # iterative read inference steps refining the keys (0: keys from e(x) only)
    hidden: int = 256

    def check(self) -> None:
        super().check()
        for k in ("mem_channels", "mem_size", "hidden"):
            need(getattr(self, k) >= 1, k, getattr(self, k), ">= 1")
        need(1 <= self.window <= self.mem_size, "window", self.window, f"in [1, model.mem_size = {self.mem_size}]")
        need(self.read_steps >= 0, "read_steps", self.read_steps, ">= 0")


# name -> ("module:LightningModule class", config dataclass): the one registry of models (km.models.MODELS
# resolves the classes, importing torch, on first use).
PinvInit = Choice("PinvInit", {"scaled": "scaled", "official": "official"})  # km.memory.pseudoinverse


@dataclass
class GPMConfig(ModelConfig):
    name: str = "gpm"
    lr: float = 1e-3
    code_dim: int = 100  # C: code size = memory width (theirs: 100)
    memory_size: int = 32  # K slots (theirs: 32)
    obs_noise: float = 0.5  # sigma of the write noise and of p(z | w, M) = N(w^T M, sigma^2) (theirs: 0.5, fixed)
    read_noise: float = 0.5  # sigma of the noise added to a query code before it is addressed (theirs: 0.5)
    pinv_steps: int = 15  # Ben-Israel-Cohen iterations per pseudo-inverse (theirs: 7 in main.py, 3 class default)
    pinv_init: PinvInit = PinvInit.scaled  # scaled: 1 / (|A|_1 |A|_inf), always converges | official: 5e-4
    ae_weight: float = 1.0  # the authors' autoencoder ("bijective") term, training loss only (not in the bound)
    sample_memory: bool = True  # training reads M ~ q(M | X); false: its mean, as the authors (reports always sample)

    def check(self) -> None:
        super().check()
        need(self.memory_size >= 1, "memory_size", self.memory_size, ">= 1")
        need(self.pinv_steps >= 1, "pinv_steps", self.pinv_steps, ">= 1: Ben-Israel-Cohen iterations")
        need(self.obs_noise > 0, "obs_noise", self.obs_noise, "> 0: a standard deviation")
        need(self.read_noise >= 0, "read_noise", self.read_noise, ">= 0: a standard deviation")
        need(self.ae_weight >= 0, "ae_weight", self.ae_weight, ">= 0")


MODELS: dict[str, tuple[str, type[ModelConfig]]] = {
    "vae": ("km.models.vae:VAE", VAEConfig),
    "km": ("km.models.km:KanervaMachine", KMConfig),
    "dkm": ("km.models.dkm:DynamicKanervaMachine", DKMConfig),
    "pkm": ("km.models.pkm:ProductKanervaMachine", PKMConfig),
    "kpp": ("km.models.kpp:KanervaPlusPlus", KPPConfig),
    "gpm": ("km.models.gpm:GenerativePseudoInverseMemory", GPMConfig),
}
CONFIGS: dict[str, type[ModelConfig]] = {name: cfg for name, (_, cfg) in MODELS.items()}
