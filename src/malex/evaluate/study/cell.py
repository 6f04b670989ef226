"""One cell of the grid: its metrics (one row per detector and one for the guard), computed from the cached
artifacts of its (dataset, seed), and the check that a cell on disk is finished and up to date."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from malex.calibration import calibrate
from malex.evaluate.study import fits, guards
from malex.evaluate.study.cache import Artifact, matches, normalise, read_json, read_meta, write_json
from malex.evaluate.study.config import BACKDOOR, GUARD
from malex.evaluate.study.grid import Cell
from malex.evaluate.study.seed import SeedRun
from malex.detectors import FLOORS
from malex.guard.verdict import BENIGN, VERDICTS
from malex.metrics import confusion, confusion_accuracy, evaluate_flags, evaluate_scores, unscored_as_suspicious

CELL_FORMAT = "malex-study-cell"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def verdict_summary(kind: str, clean_verdict: np.ndarray, malicious_verdict: np.ndarray, rows: list[dict[str, Any]],
                    members: Sequence[str]) -> dict[str, Any]:
    """The guard's verdicts on the mixed stream of the cell's clean test inputs and its malicious inputs (all of
    kind `kind`): the confusion matrix (rows true, columns verdict, in `VERDICTS` order), the three-way accuracy,
    the share of malicious inputs typed right, and the guard's AUROC and TPR at 1% FPR minus those of its best
    member and of the best floor (msp, penultimate Mahalanobis) among `rows`."""
    truth = [BENIGN] * len(clean_verdict) + [kind] * len(malicious_verdict)
    said = [VERDICTS[int(i)] for i in np.concatenate([clean_verdict, malicious_verdict])]
    matrix = confusion(truth, said, VERDICTS)
    by_name = {r["detector"]: r for r in rows}
    out: dict[str, Any] = {"labels": list(VERDICTS), "confusion": matrix.tolist(),
                           "accuracy": confusion_accuracy(matrix),
                           "typed_right": float(np.mean([v == kind for v in said[len(clean_verdict):]]))}
    for label, names in (("member", [m for m in members if m in by_name]),
                         ("floor", [f for f in FLOORS if f in by_name])):
        if names:
            best = max(names, key=lambda n: by_name[n]["auroc"])
            out[f"best_{label}"] = best
            out[f"gap_{label}_auroc"] = by_name[GUARD]["auroc"] - by_name[best]["auroc"]
            out[f"gap_{label}_tpr_at_1fpr"] = (by_name[GUARD]["tpr_at_1fpr"]
                                               - max(by_name[n]["tpr_at_1fpr"] for n in names))
    return out


def compute_cell(run: SeedRun, cell: Cell) -> dict[str, Any]:
    """Make what the cell needs (model, attack, fits, guard; cached ones are read), score its malicious inputs,
    and write its metrics.json (last, so a cell on disk is finished)."""
    t0 = time.perf_counter()
    ctx, ds = run.ctx, run.ds
    attack = ds.attack(cell.attack)
    key = attack.model_key
    model, model_meta = run.model(key)
    x, attack_meta = run.attack(attack)
    fitted = run.fits(key)
    scores = fits.malicious_scores(ctx, run.specs, cell, x, attack_meta["id"], fitted, model,
                                   lambda name: run.refit(key, name))
    guard_score, guard_flagged, guard_verdict = guards.screen_cell(
        ctx, run.specs, cell, key, x, attack_meta["id"], run.guard(key), model, lambda: run.refit_guard(key))
    guard = run.guard(key)
    rows = []
    if len(x):
        for name in ds.detectors:
            clean, malicious, unscored = unscored_as_suspicious(fitted[name].clean, scores[name])
            m = evaluate_scores(clean, malicious, calibrate(fitted[name].calibration, ctx.config.fpr))
            rows.append({"detector": name, **m.as_dict(), "clean_fpr": 1.0 - m.clean_pass, "unscored": unscored})
        m = evaluate_flags(guard.clean_score, guard.clean_flagged, guard_score, guard_flagged)
        rows.append({"detector": GUARD, **m.as_dict(), "clean_fpr": 1.0 - m.clean_pass})
        verdict = verdict_summary(attack.kind, guard.clean_verdict, guard_verdict, rows, ds.guard)
    else:
        verdict = {}
        ctx.log(f"  {cell.attack}: no successful malicious input; the cell has no rows")
    metrics = {
        "format": CELL_FORMAT,
        "spec": normalise(run.specs.cell(attack_meta["id"], {d: fitted[d].id for d in ds.detectors}, guard.id)),
        "dataset": cell.dataset, "attack": cell.attack, "kind": attack.kind, "method": attack.method,
        "seed": cell.seed, "model": key, "fpr": ctx.config.fpr,
        "model_summary": {k: model_meta[k] for k in ("clean_accuracy", "attack_success_rate") if k in model_meta},
        "attack_summary": attack_meta.get("summary", {}),
        "rows": rows, "verdict": verdict, "seconds": time.perf_counter() - t0, "finished": _now(),
    }
    write_json(ctx.layout.cell_metrics(cell.dataset, cell.attack, cell.seed), metrics)
    return metrics


def mark_learnt(cells: Sequence[dict[str, Any]], floor: float) -> list[dict[str, Any]]:
    """The finished cells' metrics with `asr_floor` and `learnt` added: for a backdoor cell, whether its poisoned
    model's attack success rate (on the test split, recorded when the model was trained) reaches `floor`; None
    for an adversarial cell or a model with no recorded rate. The tables leave the seeds not learnt out of their
    means and say so; nothing on disk depends on the floor."""
    out = []
    for cell in cells:
        asr = cell.get("model_summary", {}).get("attack_success_rate")
        known = cell["kind"] == BACKDOOR and asr is not None and math.isfinite(asr)
        learnt = bool(asr >= floor) if known else None
        out.append({**cell, "asr_floor": floor, "learnt": learnt})
    return out


def expected_cell_spec(run: SeedRun, cell: Cell) -> dict[str, Any] | None:
    """The spec a finished cell must record, from the artifacts on disk; None when one is missing or stale."""
    layout, ds, specs = run.ctx.layout, run.ds, run.specs
    attack = ds.attack(cell.attack)
    model = run.recorded_model(attack.model_key)
    if model is None:
        return None
    made = Artifact(layout.attack(ds.name, cell.seed, attack.name), specs.attack(attack, model["id"])).meta()
    if made is None:
        return None
    fit_ids = {}
    for det in ds.detectors:
        got = Artifact(layout.fit(ds.name, cell.seed, attack.model_key, det), specs.fit(det, model["id"])).meta()
        if got is None:
            return None
        fit_ids[det] = got["id"]
    guard = Artifact(layout.guard_clean(ds.name, cell.seed, attack.model_key), specs.guard(model["id"])).meta()
    if guard is None:
        return None
    return specs.cell(made["id"], fit_ids, guard["id"])


def finished_metrics(run: SeedRun, cell: Cell) -> dict[str, Any] | None:
    """The finished cell's metrics.json, or None when it or another file of the cell is missing, damaged or out
    of date."""
    layout = run.ctx.layout
    metrics = read_json(layout.cell_metrics(cell.dataset, cell.attack, cell.seed))
    if metrics is None or metrics.get("format") != CELL_FORMAT:
        return None
    expected = expected_cell_spec(run, cell)
    if expected is None or metrics.get("spec") != normalise(expected):
        return None
    for det, fit_id in expected["fits"].items():
        if not matches(read_meta(layout.cell_scores(cell.dataset, cell.attack, cell.seed, det)),
                       run.specs.scores(expected["attack"], fit_id)):
            return None
    if not matches(read_meta(layout.cell_guard(cell.dataset, cell.attack, cell.seed)),
                   run.specs.screening(expected["attack"], expected["guard"])):
        return None
    return metrics
