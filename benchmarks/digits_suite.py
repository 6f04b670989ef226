"""Every detector and the guard on the digits, for BadNets and Blend backdoors and PGD / CW examples.

For each trigger and seed: train a poisoned digits CNN, craft attacks from correctly classified test
inputs (successful ones only), fit a guard holding every detector on the clean validation split, and
report per detector and attack AUROC and TPR at 5% FPR, the guard's TPR at its calibrated FPR, and the
guard's three-way verdict accuracy on a mixed set. Results are mean +- std over seeds.

    python benchmarks/digits_suite.py --seeds 0 1 2 --out benchmarks/results/digits_suite.md
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from malex.attacks.adversarial import make_adversarial
from malex.attacks.backdoor import PoisonConfig, make_trigger, train_model, triggered_inputs
from malex.data import load_digits
from malex.detectors import DETECTORS
from malex.evaluate.guarded import GUARD_ROW, evaluate_guard
from malex.guard import ADVERSARIAL, BACKDOOR, BENIGN, Guard, GuardConfig
from malex.guard.guard import detectors_from
from malex.models.inference import predict
from malex.models.train import TrainConfig

TRIGGERS = {"BadNets": ("badnets", {"size": 2, "margin": 0}), "Blend": ("blend", {"alpha": 0.2})}
TARGET = 1


def poisoned_and_attacked(trigger_name: str, seed: int, cw_searches: int = 5):
    """(trained model, data, correctly classified test inputs, malicious sets): a digits CNN poisoned with
    `trigger_name`, its successful trigger inputs, and PGD, PGD-stop and CW (100 steps x `cw_searches` searches
    over c) examples of the correctly classified test inputs (successful ones only)."""
    data = load_digits(seed)
    kind, settings = TRIGGERS[trigger_name]
    trigger = make_trigger(kind, **settings)
    trained = train_model(data, "digits_cnn", TrainConfig(epochs=40, shift=1, seed=seed), trigger,
                          PoisonConfig(0.1, TARGET, seed), progress=False)
    model = trained.model
    correct = data.test.subset(predict(model, data.test.x) == data.test.y)
    stamped = triggered_inputs(data.test, trigger, TARGET).x
    malicious = {
        trigger_name: stamped[predict(model, stamped) == TARGET],
        "PGD": make_adversarial("pgd", eps=0.2, steps=20, seed=seed).run(
            model, correct.x, correct.y, progress=False).successful(),
        "PGD-stop": make_adversarial("pgd", eps=0.2, alpha=0.02, steps=20, random_start=False, early_stop=True).run(
            model, correct.x, correct.y, progress=False).successful(),
        "CW": make_adversarial("cw", steps=100, binary_search_steps=cw_searches).run(
            model, correct.x, correct.y, progress=False).successful(),
    }
    return trained, data, correct, malicious


def run_one(trigger_name: str, seed: int, detectors: tuple[str, ...], guard_detectors: tuple[str, ...]) -> dict:
    """One poisoned model and its attacks; every detector's rows (from a guard holding them all) and the
    rows, clean FPR and verdict accuracy of the guard holding `guard_detectors`."""
    trained, data, correct, malicious = poisoned_and_attacked(trigger_name, seed)
    model = trained.model
    every = Guard(model, GuardConfig(detectors=detectors, seed=seed, progress=False)).fit(data.val.x, data.val.y)
    guard = Guard(model, GuardConfig(detectors=guard_detectors, seed=seed, progress=False)).fit(data.val.x, data.val.y)
    rows = [r for r in evaluate_guard(every, correct.x, malicious) if r[0] != GUARD_ROW]
    rows += [r for r in evaluate_guard(guard, correct.x, malicious) if r[0] == GUARD_ROW]
    mixed_truth = [BENIGN] * len(correct.x) + [BACKDOOR] * len(malicious[trigger_name])
    mixed_x = [correct.x, malicious[trigger_name]]
    for name in ("PGD-stop", "CW"):
        mixed_truth += [ADVERSARIAL] * len(malicious[name])
        mixed_x.append(malicious[name])
    verdicts = guard.screen(torch.cat(mixed_x)).verdict
    return {
        "rows": rows,
        "clean_accuracy": trained.clean_accuracy,
        "asr": trained.attack_success_rate,
        "verdict_accuracy": float(np.mean([v == t for v, t in zip(verdicts, mixed_truth)])),
        "guard_fpr": float(guard.screen(data.test.x).flagged.mean()),
    }


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="detectors with a row each")
    parser.add_argument("--guard", default=",".join(GuardConfig.detectors), help="the guard's detectors")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_suite.md"))
    args = parser.parse_args()
    detectors, guard_detectors = detectors_from(args.detectors), detectors_from(args.guard)
    start = time.perf_counter()
    lines = ["# All detectors and the guard on the digits", "",
             f"Command: `python benchmarks/digits_suite.py --seeds {' '.join(map(str, args.seeds))}`", "",
             f"Seeds {args.seeds}; mean ± std over seeds. Clean = correctly classified test inputs; malicious = "
             "successful attacks only; detectors and the guard are fitted and calibrated on the clean validation "
             "split. Detector rows: threshold-free AUROC and TPR at 5% FPR on these clean inputs. Guard row "
             f"(detectors {', '.join(guard_detectors)}; 5% target FPR): AUROC of the guard score and TPR at the "
             "guard's calibrated threshold ('caught').", ""]
    for trigger in TRIGGERS:
        runs = [run_one(trigger, seed, detectors, guard_detectors) for seed in args.seeds]
        lines += [f"## {trigger} model", "",
                  f"clean accuracy {mean_std([r['clean_accuracy'] for r in runs])}, ASR {mean_std([r['asr'] for r in runs])}, "
                  f"guard FPR on all clean test inputs {mean_std([r['guard_fpr'] for r in runs])}, "
                  f"three-way verdict accuracy on a mixed set (clean + {trigger} + PGD-stop + CW) "
                  f"{mean_std([r['verdict_accuracy'] for r in runs])}", ""]
        table: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in runs:
            for det, attack, m in r["rows"]:
                cell = table[(det, attack)]
                cell["auroc"].append(m.auroc)
                cell["tpr5"].append(m.tpr_at_5fpr)
                cell["caught"].append(m.malicious_caught)
        attacks = list(dict.fromkeys(a for _, a in table))
        dets = list(dict.fromkeys(d for d, _ in table))
        lines.append("| detector | " + " | ".join(f"{a} AUROC | {a} TPR@5%" for a in attacks) + " |")
        lines.append("|---|" + "---:|" * (2 * len(attacks)))
        for det in dets:
            cells = []
            for a in attacks:
                c = table[(det, a)]
                second = c["caught"] if det == "guard" else c["tpr5"]
                cells += [mean_std(c["auroc"]), mean_std(second)]
            lines.append(f"| {det} | " + " | ".join(cells) + " |")
        lines.append("")
        print("\n".join(lines[-len(dets) - 3:]), flush=True)
    lines.append(f"Wall time: {time.perf_counter() - start:.0f} s on this machine (2 CPU cores).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
