"""The data of the study's three spaces, for one model and the inputs it is attacked with.

* Sensitivity space: the label-change rate (LCR) of every input under Gaussian fuzzing of the dense layers,
  at several mutation strengths r (`ModelMutation.test`, all mutants, no sequential stop). Adversarial inputs
  flip easily at a mild r; backdoor inputs resist even a strong one.
* Activation space: a 2-D embedding of each chosen layer's activations (flattened): PCA fitted on the benign
  inputs and applied to every kind, or t-SNE (scikit-learn) over all kinds together.
* Feature space: per layer, the smallest squared Mahalanobis distance to a class mean (tied covariance
  fitted on clean inputs the model was not trained on; conv maps spatially averaged).

Kinds are named "benign", "adversarial: NAME" or "backdoor: NAME" (the report colours them by that prefix).
`SpaceData` turns into named tensors and a JSON header and back, so the study caches it without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from malex.data.dataset import Split
from malex.detectors import Mahalanobis, MahalanobisConfig, ModelMutation, MutationConfig
from malex.detectors.stats import feature_matrix
from malex.errors import ConfigError, InputError
from malex.probe import Probe, default_layers

BENIGN = "benign"


@dataclass
class SpaceData:
    """Per kind of input: LCR per strength, 2-D embeddings per layer, Mahalanobis distances per layer."""

    kinds: list[str]
    strengths: list[float]
    layers: list[str]
    embedding_method: str
    lcr: dict[float, dict[str, np.ndarray]] = field(default_factory=dict)
    embedding: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    distances: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    explained: dict[str, list[float]] = field(default_factory=dict)  # PCA explained variance ratios

    def to_tensors(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able header, tensors named by indices into kinds, strengths and layers)."""
        tensors: dict[str, torch.Tensor] = {}
        for i, r in enumerate(self.strengths):
            for k, kind in enumerate(self.kinds):
                tensors[f"lcr/{i}/{k}"] = torch.from_numpy(np.asarray(self.lcr[r][kind], dtype=np.float64))
        for j, layer in enumerate(self.layers):
            for k, kind in enumerate(self.kinds):
                tensors[f"embedding/{j}/{k}"] = torch.from_numpy(np.asarray(self.embedding[layer][kind], np.float64))
                tensors[f"distance/{j}/{k}"] = torch.from_numpy(np.asarray(self.distances[layer][kind], np.float64))
        header = {"kinds": self.kinds, "strengths": self.strengths, "layers": self.layers,
                  "embedding_method": self.embedding_method, "explained": self.explained}
        return header, tensors

    @classmethod
    def from_tensors(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SpaceData":
        """Rebuild from `to_tensors`; raises KeyError when something is missing."""
        data = cls(list(header["kinds"]), [float(r) for r in header["strengths"]], list(header["layers"]),
                   header["embedding_method"], explained=dict(header.get("explained", {})))
        for i, r in enumerate(data.strengths):
            data.lcr[r] = {kind: tensors[f"lcr/{i}/{k}"].numpy() for k, kind in enumerate(data.kinds)}
        for j, layer in enumerate(data.layers):
            data.embedding[layer] = {kind: tensors[f"embedding/{j}/{k}"].numpy() for k, kind in enumerate(data.kinds)}
            data.distances[layer] = {kind: tensors[f"distance/{j}/{k}"].numpy() for k, kind in enumerate(data.kinds)}
        return data


def _embed(features: dict[str, np.ndarray], method: str, seed: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """2-D coordinates per kind: PCA fitted on the benign rows, or t-SNE over all rows together."""
    if method == "pca":
        from sklearn.decomposition import PCA

        benign = features[BENIGN]
        pca = PCA(n_components=min(2, benign.shape[1], benign.shape[0]), random_state=seed).fit(benign)
        out = {}
        for kind, f in features.items():
            z = pca.transform(f) if len(f) else np.zeros((0, pca.n_components_))
            out[kind] = np.pad(z, ((0, 0), (0, 2 - z.shape[1])))  # a 1-D layer gets a zero second axis
        return out, [float(v) for v in pca.explained_variance_ratio_]
    if method == "tsne":
        from sklearn.manifold import TSNE

        kinds = [k for k, f in features.items() if len(f)]
        stacked = np.concatenate([features[k] for k in kinds])
        perplexity = float(min(30.0, max(2.0, (len(stacked) - 1) / 3)))
        z = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
        out, start = {}, 0
        for kind, f in features.items():
            out[kind] = z[start:start + len(f)] if len(f) else np.zeros((0, 2))
            start += len(f)
        return out, []
    raise ConfigError(f"embedding method {method!r}; expected pca or tsne")


def analyse_model(
    model: nn.Module,
    fit: Split,
    inputs: dict[str, torch.Tensor],
    strengths: tuple[float, ...] = (0.1, 0.3, 0.65, 1.0),
    mutants: int = 50,
    embedding: str = "pca",
    layers: tuple[str, ...] = (),
    n: int = 200,
    seed: int = 0,
    batch_size: int = 256,
) -> SpaceData:
    """The three spaces for `model`: `inputs` maps kind -> inputs (one of them "benign"), at most `n` each;
    `fit` holds clean labelled inputs the model was not trained on (for the Mahalanobis statistics)."""
    if BENIGN not in inputs:
        raise InputError(f"the inputs need a {BENIGN!r} kind; got {', '.join(inputs)}")
    chosen = list(layers) or default_layers(model)
    mutation = [ModelMutation(model, MutationConfig(strength=r, max_mutants=mutants, seed=seed, sequential=False,
                                                    batch_size=batch_size)) for r in strengths]
    probe = Probe(model, chosen + [layer for m in mutation[:1] for layer in m.layers()])
    obs = {kind: probe.run(x[:n], batch_size=batch_size) for kind, x in inputs.items()}
    data = SpaceData(list(inputs), [float(r) for r in strengths], chosen, embedding)

    for r, det in zip(data.strengths, mutation):
        data.lcr[r] = {kind: det.test(o, sequential=False).lcr if len(o) else np.zeros(0) for kind, o in obs.items()}

    for layer in chosen:
        feats = {kind: feature_matrix(o.layer(layer), pool=False).double().numpy() for kind, o in obs.items()}
        data.embedding[layer], explained = _embed(feats, embedding, seed)
        if explained:
            data.explained[layer] = explained

    maha = Mahalanobis(model, MahalanobisConfig(layers=tuple(chosen), folds=1, seed=seed, batch_size=batch_size))
    maha.fit(Probe(model, maha.layers()).run(fit.x, batch_size=batch_size), fit.y)
    for kind, o in obs.items():
        per_layer = maha.layer_scores(o) if len(o) else np.zeros((0, len(chosen)))
        for j, layer in enumerate(chosen):
            data.distances.setdefault(layer, {})[kind] = per_layer[:, j]
    return data
