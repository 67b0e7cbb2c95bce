"""Model registry: name -> (LightningModule class, config dataclass).

A new model plugs in by adding one line here and one `configs/model/<name>.yaml`.
"""

from __future__ import annotations

from km.models.base import EpisodeModel, EpisodeOutput, ModelConfig, NonFiniteLossError
from km.models.dkm import DKMConfig, DynamicKanervaMachine
from km.models.km import KanervaMachine, KMConfig
from km.models.kpp import KanervaPlusPlus, KPPConfig
from km.models.pkm import PKMConfig, ProductKanervaMachine
from km.models.vae import VAE, VAEConfig

MODELS: dict[str, tuple[type[EpisodeModel], type[ModelConfig]]] = {
    "vae": (VAE, VAEConfig),
    "km": (KanervaMachine, KMConfig),
    "dkm": (DynamicKanervaMachine, DKMConfig),
    "pkm": (ProductKanervaMachine, PKMConfig),
    "kpp": (KanervaPlusPlus, KPPConfig),
}

__all__ = ["MODELS", "KPPConfig", "KanervaPlusPlus", "PKMConfig", "ProductKanervaMachine", "DKMConfig", "DynamicKanervaMachine", "KanervaMachine", "KMConfig", "EpisodeModel", "EpisodeOutput", "ModelConfig", "NonFiniteLossError", "VAE", "VAEConfig"]
