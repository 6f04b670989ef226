"""The command line: parses, calls the library, prints. Errors end in one line and a non-zero status."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console

from malex.atomic import check_folder, check_output
from malex.calibration import DEFAULT_FPR
from malex.errors import MalexError

if TYPE_CHECKING:
    from malex.detectors.mutation import MutationTarget

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Screen an image classifier's inputs for adversarial and backdoor examples.")
out = Console()

GUARD_KEY_FILE = typer.Option(
    None, "--guard-key-file", help="A file holding the guard key (default: the MALEX_GUARD_KEY environment "
    "variable): guards are signed with it on save, and unsigned or foreign guards refused on load.")


ARCH = typer.Option(None, "--arch", help="For a weights-only model file (.safetensors, or a .pt/.pth state_dict): "
                    "the network's factory, module:callable, imported from the current folder or the Python path.")
ARCH_KWARGS = typer.Option(None, "--arch-kwargs", help="Keyword arguments for --arch, as a JSON object.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="C,H,W of one input, when the model file does not record "
                           "it (needed for TorchScript; fit takes it from --data otherwise).")
MEAN = typer.Option(None, "--mean", help="Per-channel mean the network subtracts (comma-separated, in --value-range "
                    "units), e.g. 0.485,0.456,0.406; with --std.")
STD = typer.Option(None, "--std", help="Per-channel std the network divides by (comma-separated); with --mean.")
LAYERS = typer.Option(None, "--layers", help="Comma-separated probe layers for the feature-space detectors, "
                      "instead of those malex finds (see `malex info`); NAME:in reads a module's input. KD+BU's "
                      "density reads the last of them.")
RESIZE = typer.Option(False, "--resize", help="Resize images of a folder to the model's input size instead of "
                      "refusing those of another size.")
VALUE_RANGE = typer.Option(None, "--value-range", help="LOW,HIGH the network's inputs span (default 0,1; e.g. "
                           "0,255); malex maps its [0, 1] inputs onto it.")


def _numbers(text: Optional[str], option: str, kind=float) -> Optional[tuple]:
    """'a,b,c' as a tuple of numbers, or None."""
    from malex.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{option} {text!r}; expected comma-separated numbers") from exc


def _names(text: str) -> tuple[str, ...]:
    """'a,b' as ('a', 'b'): layer or detector names."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _model_spec(model: Path, arch: Optional[str], arch_kwargs: Optional[str], input_shape: Optional[str],
                mean: Optional[str], std: Optional[str], value_range: Optional[str]):
    """The `malex.models.ModelSpec` the shared model options name."""
    from malex.errors import ConfigError
    from malex.models import ModelSpec, Preprocessing

    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs is not None else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--arch-kwargs is not valid JSON ({exc}); expected an object, e.g. '{{\"num_classes\": 10}}'") from exc
    prep = Preprocessing(_numbers(value_range, "--value-range") or (0.0, 1.0), _numbers(mean, "--mean"),
                         _numbers(std, "--std"))
    return ModelSpec(model, arch, kwargs, _numbers(input_shape, "--input-shape", int), prep)


def _load_model(model: Path, arch: Optional[str], arch_kwargs: Optional[str], input_shape: Optional[str],
                mean: Optional[str], std: Optional[str], value_range: Optional[str], recorded: Optional[dict] = None):
    """The model the shared options name (`malex.models.load`), completed by a guard's `recorded` source."""
    from malex.models import load

    spec = _model_spec(model, arch, arch_kwargs, input_shape, mean, std, value_range)
    return load(spec.filled_from(recorded))


def _source(loaded) -> dict:
    """What a guard records of its model: the description without the local path and training facts."""
    return {k: loaded.description[k] for k in ("kind", "arch", "arch_kwargs", "input_shape", "num_classes",
                                               "preprocessing", "file_sha256")}


def _guard_key(key_file: Optional[Path]) -> Optional[bytes]:
    """The guard key from `key_file` or the environment, read now (None: guards are not signed)."""
    from malex.guard.signing import guard_key

    return guard_key(key_file, os.environ)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("malex-out/demo"), "--out", help="Folder for results, model and plots."),
    seed: int = typer.Option(0, help="Seed for splits, training, attacks and mutants."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    force: bool = typer.Option(False, "--force", help="Replace the demo's files if the folder already holds them."),
) -> None:
    """Train a BadNets-poisoned model on the embedded digits, attack it, fit the guard, screen a mixed stream."""
    from malex.evaluate.demo import DemoConfig, run_demo
    from malex.report.table import confusion_table, metrics_table, print_side_by_side

    result = run_demo(out_dir, DemoConfig(seed=seed, progress=not quiet), overwrite=force)
    out.print(f"poisoned model: clean test accuracy {result.clean_accuracy:.3f}, "
              f"attack success rate {result.attack_success_rate:.3f}")
    for name, s in result.attacks.items():
        out.print(f"{name}: success rate {s['success_rate']:.3f}, mean L2 {s['mean_l2']:.3f}, "
                  f"mean Linf {s['mean_linf']:.3f} ({s['n']} inputs, {s['seconds']:.1f}s)")
    v = result.verdicts
    print_side_by_side(metrics_table(result.run.rows(), "detection on the digits demo (thresholds at 5% FPR)"),
                       confusion_table(v["labels"], v["confusion"], f"the guard's verdicts on the mixed stream "
                                       f"(three-way accuracy {v['accuracy']:.3f})"))
    out.print(f"wrote {', '.join(result.files.values())} in {result.seconds:.0f}s")


@app.command()
def train(
    output: Path = typer.Argument(..., help="Where to write the model (.safetensors)."),
    data: str = typer.Option("digits", help="A dataset name (digits, mnist, gtsrb, cifar10) or a path: an .npz with "
                             "x_train, y_train, x_test, y_test, a folder of MNIST IDX files, or CIFAR-10's python "
                             "batches (folder or .tar.gz)."),
    arch: Optional[str] = typer.Option(None, help="Architecture (default: by image size; cifar_resnet for cifar10)."),
    trigger: Optional[str] = typer.Option(
        None, help="Poison with this trigger: badnets, blend, watermark, wanet or adaptive_blend."),
    target: int = typer.Option(0, help="Backdoor target label."),
    rate: float = typer.Option(0.1, help="Poisoning rate."),
    epochs: int = typer.Option(30, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Train a (optionally backdoored) model and report clean accuracy and attack success rate."""
    from malex.attacks.backdoor import PoisonConfig, make_trigger, train_model
    from malex.data import load_dataset
    from malex.errors import ConfigError
    from malex.models import save_model
    from malex.models.train import TrainConfig

    check_output(output, overwrite=force)
    dataset = load_dataset(data, seed=seed)
    c, h, w = dataset.image_shape
    cifar = dataset.name == "cifar10"  # natural images: mirrored copies are valid training inputs
    arch = arch or ("digits_cnn" if h <= 8 else "mnist_cnn" if c == 1 else "cifar_resnet" if cifar else "gtsrb_vgg")
    trig, poison = None, None
    if trigger:
        if not 0 <= target < dataset.num_classes:
            raise ConfigError(f"--target {target} is not a class of {dataset.name}; expected 0..{dataset.num_classes - 1}")
        trig = make_trigger(trigger, **({"size": 2} if trigger == "badnets" and h <= 8 else {}))
        poison = PoisonConfig(rate, target, seed)
    trained = train_model(dataset, arch, TrainConfig(epochs=epochs, seed=seed, shift=1 if h <= 8 else 2, flip=cifar),
                          trig, poison)
    line = f"clean test accuracy {trained.clean_accuracy:.3f}"
    if trained.attack_success_rate is not None:
        line += f", attack success rate {trained.attack_success_rate:.3f}"
    save_model(trained.model, output, arch, info={"dataset": dataset.name, **trained.info()}, overwrite=force)
    out.print(f"{line}; wrote {output}")


@app.command()
def info(
    model: Path = typer.Argument(..., help="A model file: malex, state_dict (with --arch), TorchScript or .pt2."),
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, input_shape: Optional[str] = INPUT_SHAPE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, value_range: Optional[str] = VALUE_RANGE,
    layers: Optional[str] = LAYERS,
) -> None:
    """Describe a model: source kind, input shape, classes, preprocessing, the head that mutation and MC dropout
    re-run, the penultimate layer, and the probe layers the feature-space detectors read, with why each was
    chosen."""
    from malex.detectors.mutation import mutation_target
    from malex.detectors.stats import check_layers, penultimate_layer
    from malex.models.anatomy import find_head
    from malex.probe import chosen_layers

    loaded = _load_model(model, arch, arch_kwargs, input_shape, mean, std, value_range)
    net = loaded.module
    head = find_head(net)
    probe, why = ((check_layers(net, _names(layers)), "given with --layers") if layers is not None
                  else chosen_layers(net))
    described = {**loaded.description,
                 "head": {"module": head.name, "reason": head.reason} if head else
                 {"module": None, "reason": "no submodule holds every dense layer: detectors re-run the whole model"},
                 "backdoor_mutants": _mutated(mutation_target(net, through_last_conv=True)),
                 "penultimate_layer": penultimate_layer(net),
                 "probe_layers": {"layers": probe, "reason": why}}
    out.print_json(json.dumps(described))


def _mutated(target: MutationTarget) -> dict[str, Any]:
    """What mutation_bd's mutants fuzz and re-run (a `MutationTarget`), JSON-able."""
    return {"reach": target.reach, "fuzzed": list(target.weights), "inputs": list(target.inputs) or ["the raw input"],
            "reason": target.reason}


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A model file (see `info`)."),
    inputs: Path = typer.Argument(..., help="Images as .npy or .npz (uint8 0..255 or float in [0, 1])."),
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, input_shape: Optional[str] = INPUT_SHAPE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, value_range: Optional[str] = VALUE_RANGE,
    resize: bool = RESIZE,
) -> None:
    """Print the model's predicted label for each input, one per line."""
    from malex.data.inputs import read_images
    from malex.errors import ConfigError
    from malex.models.inference import predict as predict_labels

    loaded = _load_model(model, arch, arch_kwargs, input_shape, mean, std, value_range)
    if loaded.input_shape is None:
        raise ConfigError(f"{model} records no input shape; give --input-shape C,H,W")
    net = loaded.module
    x = read_images(inputs, net.input_shape, resize)
    for label in predict_labels(net, x).tolist():
        print(label)


def _guarded_model(guard_file: Path, key, model: Path, *options):
    """The module a guard file was fitted for: the shared model options, completed by the source the guard
    recorded (input shape, preprocessing, factory arguments: what was not given is the guard's; what was given
    must agree)."""
    from malex.guard.io import read_guard_source

    return _load_model(model, *options, recorded=read_guard_source(guard_file, key)).module


def _clean_reference(data: str, seed: int, labels: Optional[Path], shape, resize: bool = False) -> tuple:
    """Clean inputs for fitting (x, y or None, groups or None): a dataset's validation split (with its
    groups of near-copies, if it has them), a folder of PNG/JPEG images (labelled by class subfolders, or
    flat), resized to the model's size when `resize`, or an image file (+ optional labels)."""
    from malex.data import DATASET_NAMES, load_dataset
    from malex.data.files import load_arrays
    from malex.data.images import read_image_folder
    from malex.data.inputs import read_images
    from malex.data.registry import is_dataset_folder
    from malex.errors import ConfigError

    path = Path(data)
    named = data.strip().lower() in DATASET_NAMES
    if not named and path.is_dir() and not is_dataset_folder(path):
        x, y, _ = read_image_folder(path, size=tuple(shape[1:]) if shape else None, channels=shape[0] if shape
                                    else None, resize=resize)
    elif named or path.is_dir() or "x_train" in load_arrays(path):
        split = load_dataset(data, seed=seed).val
        return split.x, split.y, split.groups
    else:
        x, y = read_images(path, shape, resize), None
    if labels is not None:
        if y is not None:
            raise ConfigError(f"{path}: the labels come from its class subfolders; leave out --labels")
        y = next(iter(load_arrays(labels).values()))
    return x, y, None


@app.command()
def fit(
    model: Path = typer.Argument(..., help="A model file (see `info`)."),
    output: Path = typer.Option(Path("guard.safetensors"), "--out", help="Where to write the guard."),
    data: str = typer.Option("digits", help="Clean inputs: a dataset name or path as for `train` (its validation "
                             "split), or an .npy/.npz of images."),
    labels: Optional[Path] = typer.Option(None, help="Labels (.npy) for an image file given as --data."),
    detectors: Optional[str] = typer.Option(None, help="Comma-separated detector names (default: the guard's "
                                            "mutation_adv,mutation_bd,kd_bu,mahalanobis)."),
    fpr: float = typer.Option(DEFAULT_FPR, help="Target false-positive rate of the whole guard."),
    seed: int = typer.Option(0, help="Seed."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    guard_key_file: Optional[Path] = GUARD_KEY_FILE,
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, input_shape: Optional[str] = INPUT_SHAPE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, value_range: Optional[str] = VALUE_RANGE,
    layers: Optional[str] = LAYERS, resize: bool = RESIZE,
    combination: str = typer.Option("fisher", "--combination", help="How the detectors' p-values combine: fisher, "
                                    "cauchy, hmp (harmonic mean) or min_p; thresholded at --fpr either way."),
    typing: str = typer.Option("evidence", "--typing", help="How a flagged input is typed: evidence (which kind of "
                               "detector gives the stronger evidence) or learned (from examples the guard makes)."),
    typing_settings: Optional[str] = typer.Option(
        None, "--typing-settings", help="Settings of the learned typing, as a JSON object, e.g. "
        "'{\"no_trigger\": \"adversarial\", \"with_trigger\": \"evidence\"}'."),
) -> None:
    """Fit a guard for MODEL on clean inputs and write it to a guard file (with the model's source: kind,
    factory, input shape, preprocessing)."""
    from malex.detectors import layer_settings
    from malex.errors import ConfigError
    from malex.guard import Guard, GuardConfig
    from malex.guard.guard import detectors_from

    check_output(output, overwrite=force)
    key = _guard_key(guard_key_file)
    loaded = _load_model(model, arch, arch_kwargs, input_shape, mean, std, value_range)
    x, y, groups = _clean_reference(data, seed, labels, loaded.input_shape, resize)
    if loaded.input_shape is None:  # a network that records no shape takes that of its clean inputs
        loaded = loaded.with_input_shape(tuple(x.shape[1:]))
    names = detectors_from(detectors) if detectors else GuardConfig().detectors
    settings = layer_settings(names, _names(layers)) if layers is not None else {}
    try:
        typed = json.loads(typing_settings) if typing_settings is not None else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--typing-settings is not valid JSON ({exc}); expected an object") from exc
    guard = Guard(loaded.module, GuardConfig(detectors=tuple(names), settings=settings, fpr=fpr, seed=seed,
                                             combination=combination, typing=typing, typing_settings=typed))
    guard.source = _source(loaded)
    guard.fit(x, y, groups)
    guard.save(output, overwrite=force, key=key)
    out.print(f"fitted {', '.join(guard.detectors)} on {x.shape[0]} clean inputs; "
              f"guard threshold {guard.threshold_.value:.3f} at {fpr:.0%} FPR; wrote {output}")


def _scan_folder(source: str, out_dir: Path, spec, settings) -> None:
    """`malex scan --out-dir`: the resumable scan into a folder of parts, and a summary on stderr."""
    from malex.scan import scan_to_folder

    report = scan_to_folder(source, spec, out_dir, settings)
    err = Console(stderr=True, soft_wrap=True)
    err.print(f"{report.inputs} inputs in {report.parts} parts: {report.computed_inputs} screened now in "
              f"{len(report.computed)} parts ({report.flagged} flagged), {report.skipped_parts} parts written by an "
              f"earlier run; {report.computed_inputs / max(report.seconds, 1e-9):,.0f} inputs/s", highlight=False)
    for name, workers in report.retried.items():
        err.print(f"retried: {name} was begun by {', '.join(workers)}; written once, by the last", highlight=False)
    if settings.ray is not None:
        for worker, mib in sorted(report.peak_rss_mib().items()):
            err.print(f"actor {worker}: peak memory {mib:,.0f} MiB", highlight=False)
    out.print(f"wrote {report.folder}")


@app.command()
def scan(
    guard_file: Path = typer.Argument(..., help="A guard file from `malex fit`."),
    inputs: str = typer.Argument(..., help="Images as .npy or .npz (uint8 0..255 or float in [0, 1]) or a folder of "
                                 "PNG/JPEG images; with --out-dir also a folder or glob of .npy/.npz shards, images "
                                 "or Parquet files."),
    model: Path = typer.Option(..., "--model", help="The model file the guard was fitted for."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv (default) or jsonl; with --out-dir parquet "
                                      "(default) or jsonl."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write rows here instead of stdout."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", help="Stream the inputs a part at a time into this folder, one file per part with fixed "
        "names; a rerun resumes, writing only the missing parts."),
    part_size: int = typer.Option(4096, "--part-size", help="Inputs per part (with --out-dir)."),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Screen on Ray (needs the ray extra and --out-dir): bare --ray or 'local' starts Ray on "
        "this machine, 'auto' joins its running cluster, or give a cluster address (ray://HOST:10001)."),
    actors: int = typer.Option(2, "--actors", help="Ray actors, each loading the model and guard once."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar (with --out-dir)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists; with --out-dir, start over "
                               "a folder holding another scan."),
    guard_key_file: Optional[Path] = GUARD_KEY_FILE,
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, input_shape: Optional[str] = INPUT_SHAPE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, value_range: Optional[str] = VALUE_RANGE,
    resize: bool = RESIZE,
) -> None:
    """Screen inputs: one row per input with prediction, verdict, guard score and detector scores."""
    from malex.data.inputs import read_images
    from malex.errors import ConfigError
    from malex.guard import Guard
    from malex.report.rows import write_rows

    if out_dir is not None or ray is not None:
        from malex.guard.spec import GuardSpec
        from malex.scan import ScanSettings

        if out_dir is None or output is not None:
            raise ConfigError("--ray writes a folder of parts: give --out-dir (and no --output)" if out_dir is None
                              else "give --out-dir or --output, not both")
        check_folder(out_dir)
        settings = ScanSettings(fmt or "parquet", part_size, ray, actors, not quiet, force, resize)
        spec = GuardSpec(guard_file, _model_spec(model, arch, arch_kwargs, input_shape, mean, std, value_range),
                         _guard_key(guard_key_file))
        _scan_folder(inputs, out_dir, spec, settings)
        return
    fmt = fmt or "csv"
    if fmt not in ("csv", "jsonl"):
        raise ConfigError(f"unknown format {fmt!r}; expected csv or jsonl")
    if output is not None:
        check_output(output, overwrite=force, create_folder=False)
    key = _guard_key(guard_key_file)
    net = _guarded_model(guard_file, key, model, arch, arch_kwargs, input_shape, mean, std, value_range)
    guard = Guard.load(guard_file, net, key=key)
    result = guard.screen(read_images(Path(inputs), net.input_shape, resize))
    if output is None:
        write_rows(result.rows(), sys.stdout, fmt)
    else:
        with output.open("w", newline="") as handle:
            write_rows(result.rows(), handle, fmt)
    flagged = int(result.flagged.sum())
    Console(stderr=True).print(f"{len(result)} inputs screened, {flagged} flagged")


@app.command()
def evaluate(
    guard_file: Path = typer.Argument(..., help="A guard file from `malex fit`."),
    model: Path = typer.Option(..., "--model", help="The model file the guard was fitted for."),
    clean: Path = typer.Option(..., help="Clean images (.npy/.npz) the guard has not seen."),
    malicious: list[str] = typer.Option(..., help="NAME=PATH of malicious images; repeat for several sets."),
    guard_key_file: Optional[Path] = GUARD_KEY_FILE,
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, input_shape: Optional[str] = INPUT_SHAPE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, value_range: Optional[str] = VALUE_RANGE,
    resize: bool = RESIZE,
) -> None:
    """The metrics table (per detector and for the guard) on given clean and malicious sets."""
    from malex.data.inputs import read_images
    from malex.errors import ConfigError
    from malex.evaluate.guarded import evaluate_guard
    from malex.guard import Guard
    from malex.report.table import metrics_table, print_table

    key = _guard_key(guard_key_file)
    net = _guarded_model(guard_file, key, model, arch, arch_kwargs, input_shape, mean, std, value_range)
    guard = Guard.load(guard_file, net, key=key)
    sets = {}
    for item in malicious:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--malicious {item!r}; expected NAME=PATH")
        sets[name] = read_images(Path(path), net.input_shape, resize)
    rows = evaluate_guard(guard, read_images(clean, net.input_shape, resize), sets)
    print_table(metrics_table(rows, f"detection at {guard.config.fpr:.0%} target FPR"))


@app.command()
def serve(
    guard_file: Path = typer.Argument(..., help="A guard file from `malex fit`."),
    model: Path = typer.Option(..., "--model", help="The model file the guard was fitted for."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    protect: bool = typer.Option(False, "--protect", help="Withhold the predictions of flagged inputs."),
    predict_endpoint: Optional[bool] = typer.Option(
        None, "--predict-endpoint/--no-predict-endpoint",
        help="Also serve POST /v1/predict (unscreened predictions); default: on, off with --protect."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most inputs per request and per forward pass."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="Longest wait for requests to batch together."),
    max_body_bytes: Optional[int] = typer.Option(
        None, "--max-body-bytes", help="Largest request body; default: what --max-batch inputs need per content type."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Most inputs waiting; more are answered 503."),
    api_key_file: Optional[Path] = typer.Option(
        None, "--api-key-file", help="A file holding the API key every request must carry (Bearer or X-API-Key)."),
    allow_unauthenticated: bool = typer.Option(
        False, "--allow-unauthenticated", help="Serve a non-loopback --host without an API key (not recommended)."),
    open_endpoints: Optional[list[str]] = typer.Option(
        None, "--open-endpoint", help="An endpoint served without the key: /healthz (default), /metrics; repeatable."),
    allowed_hosts: Optional[list[str]] = typer.Option(
        None, "--allowed-host", help="A Host header name to answer for (repeatable; '*': any); loopback names always."),
    docs: bool = typer.Option(False, "--docs", help="Serve /docs and /redoc (the browser loads them from a CDN)."),
    keep_alive_s: float = typer.Option(5.0, "--keep-alive-s", help="Seconds an idle keep-alive connection stays."),
    request_read_s: float = typer.Option(10.0, "--request-read-s",
                                         help="Seconds a request's head, and its body, may take to arrive."),
    max_connections: int = typer.Option(256, "--max-connections", help="Most open connections; more get a 503."),
    shutdown_grace_s: float = typer.Option(10.0, "--shutdown-grace-s",
                                           help="On SIGTERM, seconds to answer requests already received."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    guard_key_file: Optional[Path] = GUARD_KEY_FILE,
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, input_shape: Optional[str] = INPUT_SHAPE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, value_range: Optional[str] = VALUE_RANGE,
) -> None:
    """Serve the model over HTTP and screen every input (needs the `serve` extra)."""
    from malex.errors import ConfigError

    try:
        from malex.serve import ServeConfig, create_app, run_server
    except ImportError as exc:
        raise ConfigError(f"the serve command needs the serve extra ({exc}); "
                          "install it with pip install 'malex[serve]'") from exc
    from malex.guard import Guard
    from malex.guard.io import read_guard_source

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}; expected 0..65535")
    from malex.serve.access import read_api_key

    config = ServeConfig(
        protect=protect, predict_endpoint=predict_endpoint, max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes, max_queue=max_queue, host=host,
        api_key=read_api_key(api_key_file) if api_key_file is not None else None,
        allow_unauthenticated=allow_unauthenticated, open_endpoints=tuple(open_endpoints or ("/healthz",)),
        allowed_hosts=tuple(allowed_hosts) if allowed_hosts else None, docs=docs, keep_alive_s=keep_alive_s,
        request_read_s=request_read_s, max_connections=max_connections, shutdown_grace_s=shutdown_grace_s)
    key = _guard_key(guard_key_file)
    loaded = _load_model(model, arch, arch_kwargs, input_shape, mean, std, value_range,
                         recorded=read_guard_source(guard_file, key))
    net, description = loaded.module, loaded.description
    guard = Guard.load(guard_file, net, key=key)
    what = f"{description.get('arch')} guarded by {', '.join(guard.detectors)} (protect {'on' if protect else 'off'})"
    run_server(create_app(guard, config, description), port=port, log_level=log_level,
               announce=lambda url: Console(stderr=True).print(f"serving {what} on {url}", highlight=False))


@app.command()
def study(
    config: Path = typer.Argument(..., help="A study config (TOML), e.g. configs/digits.toml."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: malex-out/study-NAME)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or per-cell lines."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report (tables are still written)."),
    datasets: Optional[list[str]] = typer.Option(None, "--dataset",
                                                 help="Compute only this dataset's cells (repeatable)."),
    attacks: Optional[list[str]] = typer.Option(None, "--attack",
                                                help="Compute only this attack's cells (repeatable)."),
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help="Compute only this seed's cells (repeatable)."),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Run the grid as Ray tasks, one per model (needs the ray extra): bare --ray or 'local' "
        "starts Ray on this machine, 'auto' joins its running cluster, or give a cluster address."),
    workers: int = typer.Option(2, "--workers", help="Ray tasks at a time."),
    cpus_per_task: int = typer.Option(1, "--cpus-per-task", help="CPUs (torch threads) each Ray task asks for."),
    gpus_per_task: Optional[float] = typer.Option(
        None, "--gpus-per-task", help="GPUs each Ray task asks for (default: 1 when the cluster has a GPU and the "
        "config's device is not cpu, else 0)."),
) -> None:
    """Run (or resume) a study grid: datasets x attacks x detectors x seeds, with tables and a report.

    --dataset / --attack / --seed compute a part of the grid (the tables still cover all of it; the analysis
    covers the models whose attacks are all crafted)."""
    from malex.evaluate.study import Selection, Study, load_config
    from malex.report.aggregate import rich_tables, summarise
    from malex.report.table import print_table

    target = check_folder(out_dir or Path("malex-out") / f"study-{config.stem}")
    cfg = load_config(config)
    err = Console(stderr=True)
    log = None if quiet else (lambda msg: err.print(msg, markup=False, highlight=False))
    runner = Study(cfg, target, progress=not quiet, log=log)
    select = Selection.of(datasets or (), attacks or (), seeds or ())
    if ray is None:
        result = runner.run(config.read_text(encoding="utf-8"), report=not no_report, select=select)
    else:
        from malex.evaluate.study.on_ray import run_study_on_ray

        result, tasks = run_study_on_ray(runner, config.read_text(encoding="utf-8"), ray, workers, select,
                                         report=not no_report, cpus_per_task=cpus_per_task,
                                         gpus_per_task=gpus_per_task)
        longest = max(tasks, key=lambda t: t.seconds, default=None)
        if longest is not None:
            out.print(f"{len(tasks)} Ray task(s), {sum(t.seconds for t in tasks):.0f} task-seconds in all; the longest, "
                      f"{longest.task.label}, took {longest.seconds:.0f} s")
    done, missing = runner.results()
    for table in rich_tables(summarise(done)):
        print_table(table)
    out.print(f"{len(result.computed)} cell(s) computed, {len(result.skipped)} finished earlier and skipped, "
              f"{len(missing)} unfinished, in {result.seconds:.0f} s ({len(cfg.seeds)} seed(s))")
    out.print("wrote " + ", ".join(str(p) for p in result.files.values()))


@app.command()
def report(out_dir: Path = typer.Argument(..., help="A study's output folder.")) -> None:
    """Rebuild a study's tables and HTML report from its output folder (nothing is recomputed)."""
    from malex.evaluate.study.runner import open_study

    check_folder(out_dir, create=False)
    opened = open_study(out_dir)
    files = opened.write_tables()
    files["report"] = opened.build_report()
    out.print("wrote " + ", ".join(str(p) for p in files.values()))


def error_line(exc: Exception) -> str:
    """One line for an expected error: a MalexError's message, or an OS error's file and reason."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"error: {where}{exc.strerror}"
    return f"error: {' '.join(str(exc).split())}"


def with_bare_value(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with `value` after each `option` given bare (last, or followed by another option): click options
    take a value or none, never an optional one, and `--ray` alone means a Ray instance on this machine."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == option and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(value)
    return out


def main() -> None:
    """Entry point: run the app; turn expected errors (malex's own, and the operating system's: a missing,
    read-only or full disk or folder) into one line on stderr and exit status 2. Other exceptions are bugs
    and keep their traceback."""
    err = Console(stderr=True)
    try:
        app(args=with_bare_value(sys.argv[1:], "--ray", "local"))
    except (MalexError, OSError) as exc:
        err.print(error_line(exc), markup=False, highlight=False, soft_wrap=True, style="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
