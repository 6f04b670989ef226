"""`malex demo`: the study's pipeline once, end to end, on the embedded digits.

Train a BadNets-poisoned model, craft PGD and CW examples (successful ones only) from a budget of test inputs,
fit the default guard on clean inputs the model never saw (it calibrates itself on a held-out part), report per
detector and attack, and screen a mixed stream of the clean test inputs, the trigger inputs and the adversarial
examples: the guard's verdicts (benign / adversarial / backdoor) against the truth as a confusion matrix. Writes
results.json, the poisoned model and plots to an output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from malex.atomic import check_folder
from malex.attacks.adversarial import make_adversarial
from malex.attacks.backdoor import PoisonConfig, make_trigger, successful_triggered, train_model
from malex.calibration import DEFAULT_FPR
from malex.data import Split, load_digits
from malex.detectors import ModelMutation
from malex.evaluate.detection import DetectionRun
from malex.evaluate.guarded import screen_sets
from malex.guard import ADVERSARIAL, BACKDOOR, BENIGN, Guard, GuardConfig
from malex.guard.verdict import VERDICTS
from malex.metrics import confusion, confusion_accuracy
from malex.models import save_model
from malex.models.inference import predict
from malex.models.train import TrainConfig
from malex.report.plots import plot_confusion_matrices, plot_lcr_histograms, plot_roc_curves

MODEL_FILE, RESULTS_FILE, LCR_PLOT, ROC_PLOT = "model.safetensors", "results.json", "lcr_histograms.png", "roc_curves.png"
VERDICT_PLOT = "verdicts.png"
#: every file the demo writes in its folder; none is replaced without overwrite (CLI: --force)
DEMO_FILES = (MODEL_FILE, RESULTS_FILE, LCR_PLOT, ROC_PLOT, VERDICT_PLOT)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo.

    The trigger is the study's BadNets corner square scaled to 8x8 images: 2x2 in the bottom-right corner.
    The study's 1-pixel margin is dropped here: on 8x8 digits it would put the patch on the strokes of
    many digits rather than on the blank background where the study's 4x4 square sits on 28x28 MNIST.
    PGD is run twice: with a fixed budget (confident examples deep past the boundary) and stopped at each
    input's first success (examples just past the boundary, as CW's are). Each adversarial attack starts from
    at most `n_attack` correctly classified test inputs (a seeded random choice), and CW runs `cw_steps` Adam
    steps in each of `cw_binary_search_steps` searches over c: the budget that keeps the demo near 90 s on
    2 cores. The detectors are the guard's (`GuardConfig`'s default set).
    """

    seed: int = 0
    target: int = 1
    poison_rate: float = 0.1
    trigger_size: int = 2
    trigger_margin: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, shift=1))
    pgd_eps: float = 0.2
    pgd_steps: int = 20
    cw_steps: int = 100
    cw_binary_search_steps: int = 3
    n_attack: int = 150
    detectors: tuple[str, ...] = GuardConfig.detectors
    fpr: float = DEFAULT_FPR
    progress: bool = True


@dataclass
class DemoResult:
    """What the demo measured, and where it wrote its files."""

    clean_accuracy: float
    attack_success_rate: float
    attacks: dict[str, dict]
    run: DetectionRun
    files: dict[str, str]
    seconds: float
    verdicts: dict = field(default_factory=dict)  # labels, confusion (rows true, columns verdict), accuracy, per set
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


def _successful(model, attack: str, data: Split, cfg: DemoConfig, **settings) -> tuple[torch.Tensor, dict]:
    """The successful examples of one untargeted run over all of `data`, and that run's summary (over every
    input attacked, as the demo reports it)."""
    result = make_adversarial(attack, **settings).run(model, data.x, data.y, progress=cfg.progress)
    return result.successful(), result.summary()


def check_demo_folder(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an `out_dir` that cannot be written or (unless `overwrite`) already holds one
    of the files the demo writes (`DEMO_FILES`)."""
    out = check_folder(out_dir)
    taken = [name for name in DEMO_FILES if (out / name).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(taken)}; pass overwrite=True (CLI: --force) to "
                              "replace them, or choose another folder")
    return out


def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), overwrite: bool = False) -> DemoResult:
    """Run the whole pipeline and write results.json, model.safetensors and PNG plots to `out_dir`;
    refuses a folder already holding any of them unless `overwrite`."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = check_demo_folder(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(config.seed)

    trigger = make_trigger("badnets", size=config.trigger_size, margin=config.trigger_margin)
    # the initial weights come from the demo's seed, the training order from config.train's
    trained = train_model(data, "digits_cnn", config.train, trigger,
                          PoisonConfig(config.poison_rate, config.target, config.seed), init_seed=config.seed,
                          progress=config.progress)
    model, clean_acc, asr = trained.model, trained.clean_accuracy, trained.attack_success_rate
    timings["train"] = time.perf_counter() - start

    t0 = time.perf_counter()
    correct = data.test.subset(predict(model, data.test.x) == data.test.y)
    sources = correct.subset(torch.randperm(len(correct), generator=torch.Generator().manual_seed(config.seed))
                             [:config.n_attack])
    backdoor = successful_triggered(model, data.test, trigger, config.target).x
    pgd_x, pgd_summary = _successful(model, "pgd", sources, config, eps=config.pgd_eps, steps=config.pgd_steps,
                                     seed=config.seed)
    pgd_min_x, pgd_min_summary = _successful(model, "pgd", sources, config, eps=config.pgd_eps,
                                             alpha=config.pgd_eps / 10, steps=config.pgd_steps, random_start=False,
                                             early_stop=True)
    cw_x, cw_summary = _successful(model, "cw", sources, config, steps=config.cw_steps,
                                   binary_search_steps=config.cw_binary_search_steps)
    malicious = {"backdoor: BadNets": backdoor, "adversarial: PGD": pgd_x,
                 "adversarial: PGD-stop": pgd_min_x, "adversarial: CW": cw_x}
    timings["attacks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    guard = Guard(model, GuardConfig(detectors=config.detectors, fpr=config.fpr, seed=config.seed,
                                     progress=config.progress)).fit(data.val.x, data.val.y)
    timings["guard_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    screened = screen_sets(guard, {"clean": correct.x, **malicious})
    run = screened.detection_run("clean")
    verdicts = _verdicts(screened.screenings, malicious)
    timings["screen"] = time.perf_counter() - t0

    files = {"model": str(save_model(model, out / MODEL_FILE, "digits_cnn", overwrite=True,
                                     info={"trigger": trigger.describe(), "target": config.target,
                                           "clean_accuracy": clean_acc, "attack_success_rate": asr}))}
    files.update(_plots(out, guard.detectors, run))
    files["verdicts"] = str(plot_confusion_matrices(
        {"clean + BadNets + PGD + PGD-stop + CW": (VERDICTS, verdicts["confusion"])}, out / VERDICT_PLOT))
    result = DemoResult(clean_acc, asr, {"PGD": pgd_summary, "PGD-stop": pgd_min_summary,
                                                          "CW": cw_summary}, run, files,
                        time.perf_counter() - start, verdicts, timings)
    (out / RESULTS_FILE).write_text(json.dumps(_as_json(result, config, guard.detectors), indent=2))
    files["results"] = str(out / RESULTS_FILE)
    return result


def _verdicts(screenings: dict, malicious: dict[str, torch.Tensor]) -> dict:
    """The guard's verdicts on the mixed stream of every screened set against their truth (the set's kind)."""
    truth, said, per_set = [], [], {}
    for name, screening in screenings.items():
        kind = BENIGN if name == "clean" else BACKDOOR if name.startswith(BACKDOOR) else ADVERSARIAL
        truth += [kind] * len(screening)
        said += list(screening.verdict)
        per_set[name] = {v: int(sum(1 for s in screening.verdict if s == v)) for v in VERDICTS}
    matrix = confusion(truth, said, VERDICTS)
    return {"labels": list(VERDICTS), "confusion": matrix.tolist(), "accuracy": confusion_accuracy(matrix),
            "sets": per_set}


def _plots(out: Path, detectors: dict, run: DetectionRun) -> dict[str, str]:
    panels, thresholds = {}, {}
    for name, det in detectors.items():
        if isinstance(det, ModelMutation):
            title = f"{name}: r = {det.strength:.2f}"
            kinds = {"benign": det.test(run.observations["clean"], sequential=False).lcr}
            for attack in run.malicious_scores:
                kinds[attack] = det.test(run.observations[attack], sequential=False).lcr
            panels[title], thresholds[title] = kinds, det.lcr_threshold_
    files = {}
    if panels:
        files["lcr_histograms"] = str(plot_lcr_histograms(panels, out / LCR_PLOT, thresholds))
    curves = {a: {d: (run.clean_scores[d], s) for d, s in per.items()} for a, per in run.malicious_scores.items()}
    files["roc_curves"] = str(plot_roc_curves(curves, out / ROC_PLOT))
    return files


def _as_json(result: DemoResult, config: DemoConfig, detectors: dict) -> dict:
    return {
        "config": asdict(config),
        "clean_accuracy": result.clean_accuracy,
        "attack_success_rate": result.attack_success_rate,
        "adversarial_attacks": result.attacks,
        "detectors": {name: det.state() for name, det in detectors.items()},
        "thresholds": {name: asdict(t) for name, t in result.run.thresholds.items()},
        "metrics": [{"detector": d, "attack": a, **m.as_dict()} for d, a, m in result.run.rows()],
        "verdicts": result.verdicts,
        "seconds": result.seconds,
        "timings": result.timings,
        "files": result.files,
    }
