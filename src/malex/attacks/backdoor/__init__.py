"""Backdoor triggers (one per module) and poisoned training."""

from malex.attacks.backdoor.adaptive_blend import AdaptiveBlend, AdaptiveBlendConfig
from malex.attacks.backdoor.adaptive_patch import AdaptivePatch, AdaptivePatchConfig
from malex.attacks.backdoor.badnets import BadNets, BadNetsConfig
from malex.attacks.backdoor.base import Trigger
from malex.attacks.backdoor.blend import Blend, BlendConfig
from malex.attacks.backdoor.poison import (
    PoisonConfig, attack_source_index, attack_success_rate, poison_split, successful_triggered, triggered_inputs,
)
from malex.attacks.backdoor.tact import TaCT, TaCTConfig
from malex.attacks.backdoor.training import TrainedModel, fine_tune_model, train_model
from malex.attacks.backdoor.wanet import WaNet, WaNetConfig
from malex.attacks.backdoor.watermark import Watermark, WatermarkConfig, ring_logo
from malex.errors import ConfigError

TRIGGERS: dict[str, type[Trigger]] = {t.name: t for t in (BadNets, Blend, Watermark, WaNet, AdaptiveBlend,
                                                                  AdaptivePatch, TaCT)}


def make_trigger(name: str, **config) -> Trigger:
    """Build the trigger registered as `name` with the given settings."""
    if name not in TRIGGERS:
        raise ConfigError(f"unknown trigger {name!r}; expected one of {', '.join(TRIGGERS)}")
    try:
        cfg = TRIGGERS[name].config_type(**config)
    except TypeError as exc:
        raise ConfigError(f"bad settings for trigger {name!r}: {exc}") from exc
    return TRIGGERS[name](cfg)


__all__ = [
    "TRIGGERS", "AdaptiveBlend", "AdaptiveBlendConfig", "AdaptivePatch", "AdaptivePatchConfig", "BadNets",
    "BadNetsConfig", "Blend", "BlendConfig", "PoisonConfig", "TaCT", "TaCTConfig", "TrainedModel", "Trigger", "WaNet",
    "WaNetConfig", "Watermark", "WatermarkConfig", "attack_source_index", "attack_success_rate", "fine_tune_model",
    "make_trigger", "poison_split", "ring_logo", "successful_triggered", "train_model", "triggered_inputs",
]
