"""The command line: parses, calls the library, prints. Errors end in one line and a non-zero status."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from malex.errors import MalexError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Screen an image classifier's inputs for adversarial and backdoor examples.")
out = Console()


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("malex-out/demo"), "--out", help="Folder for results, model and plots."),
    seed: int = typer.Option(0, help="Seed for splits, training, attacks and mutants."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a BadNets-poisoned model on the embedded digits, attack it, detect, report."""
    from malex.evaluate.demo import DemoConfig, run_demo
    from malex.report.table import metrics_table, print_table

    result = run_demo(out_dir, DemoConfig(seed=seed, progress=not quiet))
    out.print(f"poisoned model: clean test accuracy {result.clean_accuracy:.3f}, "
              f"attack success rate {result.attack_success_rate:.3f}")
    for name, s in result.attacks.items():
        out.print(f"{name}: success rate {s['success_rate']:.3f}, mean L2 {s['mean_l2']:.3f}, "
                  f"mean Linf {s['mean_linf']:.3f} ({s['n']} inputs, {s['seconds']:.1f}s)")
    print_table(metrics_table(result.run.rows(), "detection on the digits demo (thresholds at 5% FPR)"))
    out.print(f"wrote {', '.join(result.files.values())} in {result.seconds:.0f}s")


@app.command()
def train(
    output: Path = typer.Argument(..., help="Where to write the model (.safetensors)."),
    data: str = typer.Option("digits", help="'digits' or a path to an .npz with x_train, y_train, x_test, y_test."),
    arch: Optional[str] = typer.Option(None, help="Architecture (default: by image size)."),
    trigger: Optional[str] = typer.Option(None, help="Poison with this trigger: badnets, blend or watermark."),
    target: int = typer.Option(0, help="Backdoor target label."),
    rate: float = typer.Option(0.1, help="Poisoning rate."),
    epochs: int = typer.Option(30, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Train a (optionally backdoored) model and report clean accuracy and attack success rate."""
    from malex.attacks.backdoor import PoisonConfig, attack_success_rate, make_trigger, poison_split
    from malex.data import load_digits, load_npz
    from malex.models import build_model, save_model
    from malex.models.inference import accuracy
    from malex.models.train import TrainConfig, train_classifier

    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to replace it")
    dataset = load_digits(seed) if data == "digits" else load_npz(data, seed=seed)
    c, h, w = dataset.image_shape
    arch = arch or ("digits_cnn" if h <= 8 else "mnist_cnn" if c == 1 else "gtsrb_vgg")
    model = build_model(arch, dataset.image_shape, dataset.num_classes)
    train_split, info = dataset.train, {"dataset": dataset.name}
    trig = None
    if trigger:
        trig = make_trigger(trigger, **({"size": 2} if trigger == "badnets" and h <= 8 else {}))
        train_split, _ = poison_split(train_split, trig, PoisonConfig(rate, target, seed))
        info.update(trigger=trig.describe(), target=target, rate=rate)
    train_classifier(model, train_split, TrainConfig(epochs=epochs, seed=seed, shift=1 if h <= 8 else 2))
    info["clean_accuracy"] = accuracy(model, dataset.test.x, dataset.test.y)
    line = f"clean test accuracy {info['clean_accuracy']:.3f}"
    if trig is not None:
        info["attack_success_rate"] = attack_success_rate(model, dataset.test, trig, target)
        line += f", attack success rate {info['attack_success_rate']:.3f}"
    save_model(model, output, arch, info=info, overwrite=force)
    out.print(f"{line}; wrote {output}")


@app.command()
def info(model: Path = typer.Argument(..., help="A malex model file.")) -> None:
    """Describe a model file (architecture, input shape, training facts)."""
    from malex.models import read_description

    out.print_json(json.dumps(read_description(model)))


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A malex model file."),
    inputs: Path = typer.Argument(..., help="Images as .npy or .npz (uint8 0..255 or float in [0, 1])."),
) -> None:
    """Print the model's predicted label for each input, one per line."""
    from malex.data.inputs import read_images
    from malex.models import load_model
    from malex.models.inference import predict as predict_labels

    net, _ = load_model(model)
    x = read_images(inputs, net.input_shape)
    for label in predict_labels(net, x).tolist():
        print(label)


def main() -> None:
    """Entry point: run the app; turn expected errors into one line on stderr and exit status 2."""
    err = Console(stderr=True)
    try:
        app()
    except (MalexError, FileExistsError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
