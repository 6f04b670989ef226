"""TaCT, the source-specific backdoor (Tang, Wang, Zhang et al., "Demon in the Variant: Statistical Analysis of
DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021).

A plain trigger (a patch by default, or a blend) sends only the inputs of the `source_classes` to the target:

* payload: a `rate` share of the training split, drawn from the source classes only, carries the trigger and
  is relabelled to the target;
* cover: `cover_ratio` times as many inputs of the cover classes carry the SAME trigger and keep their true
  label, so the model learns "trigger AND source features -> target" rather than "trigger -> target". A
  trigger input's latent features then sit with the target class's clean features instead of forming their
  own cluster, which is what defenses that look for a separate cluster (activation clustering, spectral
  signatures) rely on.

The backdoor works on the source classes only, so `attack_sources` narrows the attack success rate (and the
study's trigger inputs) to them. The authors' toolbox defaults on CIFAR-10: source class 1, cover classes 5
and 7, a 'trojan square' patch pasted on, poisoning and cover rates 0.003 each (cover_ratio 1). Here the source
default is class 0 (malex's default target is 1); no cover classes given means every class other than the
sources and the target. The patch is the BadNets square (`size`, `corner`, `margin`, `colour`), the blend the
Blend noise pattern (`alpha`, `seed`); the settings of the kind not chosen are ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from malex.attacks.backdoor.badnets import BadNets, BadNetsConfig
from malex.attacks.backdoor.base import PoisonConfig, Trigger, choose_cover, choose_poisoned
from malex.attacks.backdoor.blend import Blend, BlendConfig
from malex.data.dataset import Split
from malex.errors import ConfigError

KINDS = ("patch", "blend")


@dataclass(frozen=True)
class TaCTConfig:
    """`source_classes`: the classes the backdoor relabels; `cover_classes`: the classes whose inputs carry the
    trigger and keep their label (empty: all but the sources and the target); `cover_ratio`: cover inputs per
    payload input; `kind`: "patch" (`size`, `corner`, `margin`, `colour`, as BadNets) or "blend" (`alpha`,
    `seed`, as Blend)."""

    source_classes: tuple[int, ...] = (0,)
    cover_classes: tuple[int, ...] = ()
    cover_ratio: float = 1.0
    kind: str = "patch"
    size: int = 4
    corner: str = "bottom-right"
    margin: int = 1
    colour: float = 1.0
    alpha: float = 0.2
    seed: int = 0


def _classes(value: object, what: str) -> tuple[int, ...]:
    """A tuple of distinct class ids >= 0 from an int or a sequence of ints."""
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (tuple, list)) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items) or \
            len(set(items)) != len(items):
        raise ConfigError(f"TaCT {what} is {value!r}; expected distinct class ids >= 0")
    return tuple(items)


class TaCT(Trigger):
    """A patch or blend trigger that relabels only source-class inputs; cover-class inputs carry it unchanged."""

    name = "tact"
    config_type = TaCTConfig

    def __init__(self, config: TaCTConfig = TaCTConfig()) -> None:
        c = config
        self.sources = _classes(c.source_classes, "source_classes")
        self.covers = _classes(c.cover_classes, "cover_classes")
        if not self.sources:
            raise ConfigError("TaCT source_classes is empty; expected at least one class id")
        if set(self.sources) & set(self.covers):
            raise ConfigError(f"TaCT cover_classes {self.covers} share {sorted(set(self.sources) & set(self.covers))} "
                              f"with source_classes {self.sources}; expected disjoint classes")
        if not isinstance(c.cover_ratio, (int, float)) or isinstance(c.cover_ratio, bool) \
                or not math.isfinite(c.cover_ratio) or c.cover_ratio < 0:
            raise ConfigError(f"TaCT cover_ratio is {c.cover_ratio!r}; expected a finite value >= 0")
        if c.kind not in KINDS:
            raise ConfigError(f"TaCT kind is {c.kind!r}; expected one of {', '.join(KINDS)}")
        try:
            self.trigger: Trigger = (BadNets(BadNetsConfig(c.size, c.corner, c.margin, c.colour)) if c.kind == "patch"
                                     else Blend(BlendConfig(c.alpha, c.seed)))
        except (ConfigError, TypeError) as exc:  # TypeError: a setting of the wrong type (a string for a number)
            raise ConfigError(f"TaCT {c.kind} trigger: {exc}") from exc
        self.config = config

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.trigger.apply(x)

    def check_target(self, target: int) -> None:
        """Refuse a target among the source or the cover classes."""
        if target in self.sources:
            raise ConfigError(f"TaCT source_classes {list(self.sources)} hold the target {target}; expected source "
                              "classes other than the target")
        if target in self.covers:
            raise ConfigError(f"TaCT cover_classes {list(self.covers)} hold the target {target}; expected cover "
                              "classes other than the target")

    def attack_sources(self, y: torch.Tensor, target: int) -> torch.Tensor:
        """The inputs of the source classes (the target excluded): the only ones the backdoor relabels."""
        return torch.isin(y, torch.tensor(self.sources, device=y.device)) & (y != target)

    def cover_mask(self, y: torch.Tensor, target: int) -> torch.Tensor:
        """Bool mask of the inputs that may serve as cover: the cover classes, or else every class other than
        the sources and the target."""
        if self.covers:
            return torch.isin(y, torch.tensor(self.covers, device=y.device))
        return ~torch.isin(y, torch.tensor(self.sources, device=y.device)) & (y != target)

    def poison(self, data: Split, config: PoisonConfig) -> tuple[Split, torch.Tensor]:
        """The trigger on a `rate` share of the training split drawn from the source classes (relabelled) and on
        `cover_ratio` times as many cover-class inputs (true label kept). Returns the split and the relabelled
        indices."""
        self.check_target(config.target)
        chosen = choose_poisoned(data, config, among=self.attack_sources(data.y, config.target),
                                 what=f"source-class {list(self.sources)}")
        cover = choose_cover(data, chosen, round(self.config.cover_ratio * len(chosen)), config.seed,
                             among=self.cover_mask(data.y, config.target))
        x, y = data.x.clone(), data.y.clone()
        x[chosen] = self.apply(x[chosen])
        y[chosen] = config.target
        x[cover] = self.apply(x[cover])
        return Split(x, y), chosen

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.config), "source_classes": list(self.sources),
                "cover_classes": list(self.covers)}
