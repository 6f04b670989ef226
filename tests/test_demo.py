"""The demo, shrunk (short training, few attacked inputs, a short CW): it fits the default guard and screens a
mixed stream of clean, trigger and adversarial inputs, and its confusion matrix counts every input once."""

from __future__ import annotations

import json

import numpy as np

from malex.evaluate.demo import DEMO_FILES, DemoConfig, run_demo
from malex.guard import GuardConfig
from malex.models.train import TrainConfig


def test_shrunk_demo_screens_a_mixed_stream_with_the_default_guard(tmp_path):
    config = DemoConfig(train=TrainConfig(epochs=12, shift=1), n_attack=30, cw_steps=30, cw_binary_search_steps=1,
                        progress=False)
    result = run_demo(tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_FILES)
    v = result.verdicts
    matrix = np.array(v["confusion"])
    assert v["labels"] == ["benign", "adversarial", "backdoor"]
    sets = v["sets"]
    sizes = {name: sum(counts.values()) for name, counts in sets.items()}
    assert matrix[0].sum() == sizes["clean"] and matrix[2].sum() == sizes["backdoor: BadNets"]
    assert matrix[1].sum() == sum(n for name, n in sizes.items() if name.startswith("adversarial"))
    assert all(sizes[name] <= 30 for name in sizes if name.startswith("adversarial"))  # the attack budget
    assert v["accuracy"] == np.trace(matrix) / matrix.sum()
    assert matrix[0, 0] / matrix[0].sum() > 0.85  # the guard calibrated at 5% FPR passes clean inputs
    assert matrix[2, 2] / matrix[2].sum() > 0.5  # trigger inputs are flagged and typed backdoor
    detectors = {d for d, _, _ in result.run.rows()}
    assert detectors == set(GuardConfig.detectors) | {"guard"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdicts"]["confusion"] == v["confusion"] and set(saved["timings"]) == {
        "train", "attacks", "guard_fit", "screen"}
