"""Detectors on one contract (base.py), calibration, and a registry by name."""

from __future__ import annotations

from typing import Callable

from torch import nn

from malex.detectors.base import Detector
from malex.calibration import Threshold, calibrate
from malex.detectors.ibd_psc import IBDPSC, IBDPSCConfig
from malex.detectors.kd_bu import KDBU, KDBUConfig
from malex.detectors.lid import LID, LIDConfig
from malex.detectors.mahalanobis import Mahalanobis, MahalanobisConfig
from malex.detectors.msp import MSP, MSPConfig
from malex.detectors.nic import NIC, NICConfig
from malex.detectors.scale_up import ScaleUp, ScaleUpConfig
from malex.detectors.squeeze import FeatureSqueezing, SqueezeConfig
from malex.detectors.mutation import ModelMutation, MutationConfig, MutationTest
from malex.detectors.sprt import SPRT
from malex.detectors.strip import Strip, StripConfig
from malex.errors import ConfigError


def _mutation(**overrides) -> Callable[..., Detector]:
    def build(model: nn.Module, **kwargs) -> Detector:
        return ModelMutation(model, MutationConfig(**{**overrides, **kwargs}))

    return build


#: name -> builder(model, **settings). `mutation_adv` and `mutation_bd` are the two sides of the study's
#: test; `mutation_bd` calibrates its strength on clean data (start: the study's r = 0.65), while
#: `mutation_bd_fixed` keeps r = 0.65 as the study's code does.
DETECTORS: dict[str, Callable[..., Detector]] = {
    "mutation_adv": _mutation(strength=0.3, suspicious="high"),
    "mutation_bd": _mutation(strength=0.65, target_clean_lcr=0.6, suspicious="low"),
    "mutation_bd_fixed": _mutation(strength=0.65, suspicious="low"),
    "strip": lambda model, **kw: Strip(model, StripConfig(**kw)),
    "mahalanobis": lambda model, **kw: Mahalanobis(model, MahalanobisConfig(**kw)),
    "lid": lambda model, **kw: LID(model, LIDConfig(**kw)),
    "kd_bu": lambda model, **kw: KDBU(model, KDBUConfig(**kw)),
    "nic": lambda model, **kw: NIC(model, NICConfig(**kw)),
    "squeeze": lambda model, **kw: FeatureSqueezing(model, SqueezeConfig(**kw)),
    "scale_up": lambda model, **kw: ScaleUp(model, ScaleUpConfig(**kw)),
    "ibd_psc": lambda model, **kw: IBDPSC(model, IBDPSCConfig(**kw)),
    # the floor of every table: maximum softmax probability, and Mahalanobis on the penultimate layer only
    "msp": lambda model, **kw: MSP(model, MSPConfig(**kw)),
    "mahalanobis_penultimate": lambda model, **kw: Mahalanobis.penultimate(model, **kw),
}
#: the plain baselines that need no method at all; a detector earns its place where it beats them
FLOORS: tuple[str, ...] = ("msp", "mahalanobis_penultimate")


def make_detector(name: str, model: nn.Module, **settings) -> Detector:
    """Build the detector registered as `name` for `model`."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
    try:
        return DETECTORS[name](model, **settings)
    except TypeError as exc:
        raise ConfigError(f"bad settings for detector {name!r}: {exc}") from exc


__all__ = [
    "DETECTORS", "FLOORS", "IBDPSC", "IBDPSCConfig", "NIC", "NICConfig", "FeatureSqueezing", "SqueezeConfig", "ScaleUp",
    "ScaleUpConfig", "KDBU", "LID", "SPRT", "Detector", "KDBUConfig", "LIDConfig", "Mahalanobis", "MahalanobisConfig", "ModelMutation", "MSP", "MSPConfig", "MutationConfig", "MutationTest", "Strip", "StripConfig",
    "Threshold", "calibrate", "make_detector",
]
