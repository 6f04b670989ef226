"""The guard's typing on the digits: the evidence rule against the learned typing (fitted on examples the guard
makes itself), on a mixed stream of clean, trigger and adversarial inputs.

For each trigger and seed: train a poisoned digits CNN, craft the evaluation's attacks from correctly
classified test inputs (successful ones only: PGD-Linf eps 0.2 x 20 steps, PGD stopped at the first success,
CW-L2 100 steps x 3 searches), fit a guard on the clean validation split, and screen the mixed stream (every
correctly classified test input, the trigger inputs, and each attack's examples). The same fitted guard is then
given a learned typing (`Guard.fit_typing`, on its own fit inputs: PGD at eps 0.05 / 0.1 / 0.3 x 10 steps, fixed
and early-stopped, and universal patches and blends it optimises; never the evaluation's settings), so detection
is identical and only the typing differs. Reports three-way accuracy, each kind's share typed right (flagged and
called its kind), and the typing's fit time. Mean ± std over seeds.

    python benchmarks/guard_typing.py --seeds 0 1 2 --out benchmarks/results/guard_typing_digits.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from digits_suite import TRIGGERS, poisoned_and_attacked
from malex.guard import ADVERSARIAL, BACKDOOR, BENIGN, Guard, GuardConfig
from malex.guard.guard import EVIDENCE, LEARNED, detectors_from, fit_calibration_split
from malex.guard.verdict import VERDICTS
from malex.metrics import confusion, confusion_accuracy


def mixed_stream(trigger_name: str, seed: int) -> tuple[torch.nn.Module, object, dict[str, torch.Tensor]]:
    """(model, data, sets): the clean test inputs the model gets right, the trigger inputs that reach the target
    and the evaluation's adversarial examples (`digits_suite.poisoned_and_attacked`, CW with 3 searches)."""
    trained, data, correct, malicious = poisoned_and_attacked(trigger_name, seed, cw_searches=3)
    return trained.model, data, {"clean": correct.x, **malicious}


def truth_of(name: str, trigger_name: str) -> str:
    return BENIGN if name == "clean" else BACKDOOR if name == trigger_name else ADVERSARIAL


def measure(guard: Guard, sets: dict[str, torch.Tensor], trigger_name: str) -> dict:
    """Three-way accuracy on the mixed stream and each set's share of verdicts equal to its truth."""
    truth, said, right = [], [], {}
    for name, x in sets.items():
        verdict = guard.screen(x).verdict
        t = truth_of(name, trigger_name)
        truth += [t] * len(verdict)
        said += verdict
        right[name] = float(np.mean([v == t for v in verdict])) if verdict else float("nan")
    matrix = confusion(truth, said, VERDICTS)
    return {"accuracy": confusion_accuracy(matrix), "right": right, "confusion": matrix}


def run_one(trigger_name: str, seed: int, detector_sets: list[tuple[str, ...]]) -> list[dict]:
    """One poisoned model and its attacks; per detector set, the guard's verdicts before and after typing."""
    model, data, sets = mixed_stream(trigger_name, seed)
    out = []
    for detectors in detector_sets:
        t0 = time.perf_counter()
        guard = Guard(model, GuardConfig(detectors=detectors, seed=seed, progress=False)).fit(data.val.x, data.val.y)
        fit_seconds = time.perf_counter() - t0
        before = measure(guard, sets, trigger_name)
        cfg = guard.config  # the learned typing attacks the guard's own fit inputs, as Guard.fit does
        fit_idx, _ = fit_calibration_split(data.val.y, None, cfg.calibration_fraction, cfg.max_fit, cfg.seed)
        guard.fit_typing(data.val.x[fit_idx])
        after = measure(guard, sets, trigger_name)
        out.append({"before": before, "after": after, "fit_seconds": fit_seconds,
                    "typing_seconds": guard.typing_seconds_, "learned": guard.kind_model_ is not None,
                    "sizes": {k: len(v) for k, v in sets.items()}})
    return out


def mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else float('nan'):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--guard", action="append", default=None,
                        help="a guard's detectors, comma-separated (repeatable; default: the default set)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard_typing_digits.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    sets = [detectors_from(g) for g in (args.guard or [",".join(GuardConfig.detectors)])]
    start = time.perf_counter()
    lines = ["# The guard's typing on the digits: evidence rule vs learned typing", "",
             f"Command: `python {shlex.join(['benchmarks/guard_typing.py'] + argv)}`", "",
             f"Seeds {args.seeds}; mean ± sample std over seeds. 'before': the evidence rule ({EVIDENCE}); 'after': "
             f"the same fitted guard with a learned typing ({LEARNED}). 'right' = share of a set whose verdict is its "
             "truth (clean: benign; malicious: flagged and typed as its kind). Fit times on this machine (2 shared "
             "cores, runs nice'd on one thread).", ""]
    for trigger in TRIGGERS:
        per_seed = [run_one(trigger, seed, sets) for seed in args.seeds]
        for i, detectors in enumerate(sets):
            runs = [r[i] for r in per_seed]
            names = list(runs[0]["sizes"])
            lines += [f"## {trigger}; guard of {', '.join(detectors)}", "",
                      "| typing | three-way acc. | " + " | ".join(f"{n} right" for n in names) + " |",
                      "|---|---:|" + "---:|" * len(names)]
            for when in ("before", "after"):
                lines.append(f"| {EVIDENCE if when == 'before' else LEARNED} | "
                             f"{mean_std([r[when]['accuracy'] for r in runs])} | "
                             + " | ".join(mean_std([r[when]["right"][n] for r in runs]) for n in names) + " |")
            sizes = ", ".join(f"{n} {np.mean([r['sizes'][n] for r in runs]):.0f}" for n in names)
            summed = {w: sum(r[w]["confusion"] for r in runs).tolist() for w in ("before", "after")}
            lines += ["", f"Inputs per seed (mean): {sizes}. Guard fit {mean_std([r['fit_seconds'] for r in runs])} s; "
                          f"learned typing fit {mean_std([r['typing_seconds'] for r in runs])} s, a learned model in "
                          f"{sum(r['learned'] for r in runs)} of {len(runs)} seeds (else no universal trigger worked "
                          "like a planted one and the evidence rule stayed). Confusion summed over "
                          f"seeds (rows true, columns verdict, {' / '.join(VERDICTS)}): before {summed['before']}, "
                          f"after {summed['after']}.", ""]
            print("\n".join(lines[-9:]), flush=True)
    lines.append(f"Wall time: {time.perf_counter() - start:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
