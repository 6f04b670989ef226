"""Feature matching in the Linf ball: move an input's penultimate features onto those of a clean input of another
class (in the manner of Sabour et al., "Adversarial manipulation of deep representations", ICLR 2016).

Feature-space detectors (Mahalanobis, KD, LID) score how far an input's hidden features lie from the clean ones of
its predicted class; an input whose features sit on a real clean input of the class it is moved to looks clean to
them without the attack knowing any detector. The attack is given `guides`, clean inputs with their labels
(`FeatureMatching(config).toward(x_guides, y_guides)`): each input is steered to the guide whose features are
nearest to its own among the guides of the target class (targeted), or among the guides of every class but its
own (untargeted). Steps are signed gradients of the squared feature distance, of size alpha shrinking along a
cosine to alpha / 100, each followed by projection onto the eps ball and [0, 1], from a uniform random start. Of
the iterates that fool the model, each input keeps the one nearest its guide in feature space; an input never
fooled gets its final iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malex.attacks.adversarial.base import (
    AdversarialAttack, cosine_step, input_gradient, is_count, is_number, linf_project, random_start, require,
)
from malex.data import to_labels, to_nchw_float
from malex.errors import ConfigError
from malex.probe import penultimate_layer, trace


@dataclass(frozen=True)
class FeatureMatchingConfig:
    """eps: Linf budget; alpha: first step size (None -> eps / 10); steps; layer: the feature layer (None: the
    model's penultimate layer); random_start; seed: for the random start."""

    eps: float = 0.3
    alpha: float | None = None
    steps: int = 100
    layer: str | None = None
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        require(is_number(self.eps) and 0.0 <= self.eps <= 1.0,
                f"FeatureMatching eps is {self.eps!r}; expected a number in [0, 1]")
        require(self.alpha is None or (is_number(self.alpha) and self.alpha > 0.0),
                f"FeatureMatching alpha is {self.alpha!r}; expected None (eps / 10) or a number > 0")
        require(is_count(self.steps), f"FeatureMatching steps is {self.steps!r}; expected an int >= 1")
        require(self.layer is None or (isinstance(self.layer, str) and bool(self.layer)),
                f"FeatureMatching layer is {self.layer!r}; expected None or a layer name")
        require(isinstance(self.random_start, bool),
                f"FeatureMatching random_start is {self.random_start!r}; expected a bool")
        require(is_count(self.seed, minimum=0), f"FeatureMatching seed is {self.seed!r}; expected an int >= 0")

    def step_at(self, step: int) -> float:
        """The step size of step `step`: alpha (eps / 10 by default) decayed along a cosine to 1% of it."""
        return cosine_step(self.eps / 10.0 if self.alpha is None else float(self.alpha), step, self.steps)


class FeatureMatching(AdversarialAttack):
    """Linf PGD that pulls the penultimate features onto those of a clean input of another class."""

    name = "feature_matching"
    config_class = FeatureMatchingConfig
    config: FeatureMatchingConfig

    def __init__(self, config: FeatureMatchingConfig | None = None,
                 guides: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(config)
        self.guides = guides

    def toward(self, x_guides: object, y_guides: object) -> "FeatureMatching":
        """The same attack steered towards the clean inputs `x_guides` with labels `y_guides`."""
        x = to_nchw_float(x_guides, source="feature-matching guides")
        y = to_labels(y_guides, n=x.shape[0], source="feature-matching guide labels")
        require(x.shape[0] > 0, "feature matching needs at least one guide input")
        return FeatureMatching(self.config, (x, y))

    def _features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layer = self.config.layer or penultimate_layer(model)
        return trace(model, x, [layer]).layer(layer).flatten(1)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        if self.guides is None:
            raise ConfigError("feature matching has no guides; give clean inputs with attack.toward(x, y)")
        gx, gy = (t.to(x.device) for t in self.guides)
        with torch.no_grad():
            guide_f = self._features(model, gx)
            own_f = self._features(model, x)
        d2 = torch.cdist(own_f, guide_f).square()
        allowed = gy.view(1, -1) == target.view(-1, 1) if target is not None else gy.view(1, -1) != y.view(-1, 1)
        if not bool(allowed.any(dim=1).all()):
            raise ConfigError("some inputs have no guide of a class they may be moved to; give guides of every class")
        goal = guide_f[d2.masked_fill(~allowed, float("inf")).argmin(dim=1)]

        eps = self.config.eps
        adv = random_start(x, eps, generator) if self.config.random_start and eps > 0 else x.clone()
        best = adv.clone()
        best_d = torch.full((x.shape[0],), float("inf"), device=x.device)
        for step in range(self.config.steps + 1):
            xg = adv.detach().requires_grad_(True)
            layer = self.config.layer or penultimate_layer(model)
            obs = trace(model, xg, [layer])
            dist = (obs.layer(layer).flatten(1) - goal).square().sum(dim=1)
            pred = obs.logits.argmax(dim=1)
            fooled = pred != y if target is None else pred == target
            keep = fooled & (dist.detach() <= best_d)
            best[keep] = adv[keep]
            best_d[keep] = dist.detach()[keep]
            if step == self.config.steps:
                break
            grad = input_gradient(dist.sum(), xg)
            adv = adv - self.config.step_at(step) * grad.sign()
            adv = linf_project(adv, x, eps)
        never = torch.isinf(best_d)
        best[never] = adv[never]
        return best
