"""Detectors on one contract (base.py), calibration, and a registry by name.

Each registered class owns its identity (`name`, `config_class`, `evidence`); adding a detector means one
module with its class and one entry in `DETECTORS`. Build one by class (`LID(model, LIDConfig(k=10))`) or by
name (`make_detector("lid", model, k=10)`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from malex.calibration import Threshold, calibrate
from malex.detectors.base import ADVERSARIAL, BACKDOOR, EVIDENCE_KINDS, Detector
from malex.detectors.fitting import fit_detectors, joint_probe, score_detectors
from malex.detectors.ibd_psc import IBDPSC, IBDPSCConfig
from malex.detectors.kd_bu import KDBU, KDBUConfig
from malex.detectors.lid import LID, LIDConfig
from malex.detectors.mahalanobis import Mahalanobis, MahalanobisConfig, PenultimateConfig, PenultimateMahalanobis
from malex.detectors.msp import MSP, MSPConfig
from malex.detectors.mutation import (
    AdversarialMutation, AdversarialMutationConfig, BackdoorMutation, BackdoorMutationConfig, FixedBackdoorMutation,
    FixedBackdoorMutationConfig, ModelMutation, MutationConfig, MutationTest,
)
from malex.detectors.nic import NIC, NICConfig
from malex.detectors.scale_up import ScaleUp, ScaleUpConfig
from malex.detectors.sprt import SPRT
from malex.detectors.squeeze import FeatureSqueezing, SqueezeConfig
from malex.detectors.strip import Strip, StripConfig
from malex.errors import ConfigError

#: name -> detector class. `mutation_adv` and `mutation_bd` are the two sides of the study's test;
#: `mutation_bd` calibrates its strength on clean data (start: the study's r = 0.65), while
#: `mutation_bd_fixed` keeps r = 0.65 as the study's code does. The last two are the floor of every table:
#: maximum softmax probability, and Mahalanobis on the penultimate layer only.
DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (
    AdversarialMutation, BackdoorMutation, FixedBackdoorMutation, Strip, Mahalanobis, LID, KDBU, NIC,
    FeatureSqueezing, ScaleUp, IBDPSC, MSP, PenultimateMahalanobis,
)}
#: the plain baselines that need no method at all; a detector earns its place where it beats them
FLOORS: tuple[str, ...] = ("msp", "mahalanobis_penultimate")


def detector_class(name: str) -> type[Detector]:
    """The detector class registered as `name`; raises `ConfigError` for an unknown name."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
    return DETECTORS[name]


def detector_config_fields(name: str) -> set[str]:
    """The settings the detector registered as `name` takes (the fields of its config class)."""
    return {f.name for f in dataclasses.fields(detector_class(name).config_class)}


def layer_settings(names: tuple[str, ...] | list[str], layers: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """Settings that make the detectors `names` read `layers` instead of the model's default probe layers:
    `layers` for each detector that reads several (Mahalanobis, LID, NIC), and the last of them as `layer`
    for each that reads one (KD+BU's density). Detectors that read no chosen layer get nothing."""
    if not layers or not all(isinstance(n, str) and n for n in layers):
        raise ConfigError(f"layers are {layers!r}; expected one or more layer names")
    settings: dict[str, dict[str, object]] = {}
    for name in names:
        fields = detector_config_fields(name)
        if "layers" in fields:
            settings[name] = {"layers": tuple(layers)}
        elif "layer" in fields:
            settings[name] = {"layer": layers[-1]}
    return settings


def make_detector(name: str, model: nn.Module, **settings: object) -> Detector:
    """The detector registered as `name` for `model`, configured by `settings` (the fields of its config
    class); raises `ConfigError` for an unknown name, an unknown setting or a bad value."""
    cls = detector_class(name)
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for detector {name!r}; "
                          f"expected some of {', '.join(fields)}")
    try:
        return cls(model, cls.config_class(**settings))
    except TypeError as exc:
        raise ConfigError(f"bad settings for detector {name!r}: {exc}") from exc


__all__ = [
    "ADVERSARIAL", "BACKDOOR", "DETECTORS", "EVIDENCE_KINDS", "FLOORS", "IBDPSC", "IBDPSCConfig", "NIC", "NICConfig",
    "FeatureSqueezing", "SqueezeConfig", "ScaleUp", "ScaleUpConfig", "KDBU", "LID", "SPRT", "Detector", "KDBUConfig",
    "LIDConfig", "Mahalanobis", "MahalanobisConfig", "PenultimateConfig", "PenultimateMahalanobis", "ModelMutation",
    "AdversarialMutation", "AdversarialMutationConfig", "BackdoorMutation", "BackdoorMutationConfig",
    "FixedBackdoorMutation", "FixedBackdoorMutationConfig", "MSP", "MSPConfig", "MutationConfig", "MutationTest",
    "Strip", "StripConfig", "Threshold", "calibrate", "detector_class", "detector_config_fields", "fit_detectors",
    "joint_probe", "layer_settings", "make_detector", "score_detectors",
]
