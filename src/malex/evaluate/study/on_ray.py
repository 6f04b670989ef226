"""The study grid on Ray: one task per model of each (dataset, seed), which trains the model, crafts its attacks,
fits the detectors and the guard, scores its cells and (at the analysis seed) makes its three-space analysis.
Each task writes the same content-named artifacts into the study's folder as a local run does, so local and Ray
runs resume each other's work; no two tasks write the same artifact (a model's artifacts are its task's). The
driver claims the folder first and writes the tables and the report from it at the end. A shared folder (the
same path on every node) is needed on a cluster of several machines."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from malex.cluster import check_workers, import_ray, malex_cause, start_ray
from malex.evaluate.study.config import CLEAN_MODEL, StudyConfig
from malex.evaluate.study.grid import Cell, Selection
from malex.evaluate.study.runner import Study, StudyRun


@dataclass(frozen=True)
class ModelTask:
    """The cells of one model of one (dataset, seed): its attacks, in the grid's order."""

    dataset: str
    seed: int
    key: str
    attacks: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.dataset} / {self.key} model / seed {self.seed}"


@dataclass(frozen=True)
class TaskDone:
    """What a task did: the cells it computed (the others were on disk), its work counts, its worker, and when
    it started and ended (seconds since the epoch)."""

    task: ModelTask
    computed: tuple[Cell, ...]
    counts: dict[str, int] = field(default_factory=dict)
    worker: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def model_tasks(config: StudyConfig, select: Selection = Selection()) -> list[ModelTask]:
    """One task per (dataset, seed, model) with a selected cell, in the grid's order."""
    tasks = []
    for ds in config.datasets:
        for seed in config.seeds:
            for key in ds.model_keys:
                attacks = tuple(a.name for a in ds.attacks_on(key) if select.covers(Cell(ds.name, a.name, seed)))
                if attacks:
                    tasks.append(ModelTask(ds.name, seed, key, attacks))
    return tasks


def waits_for(task: ModelTask, waiting: list[ModelTask], running: list[ModelTask], config: StudyConfig) -> bool:
    """Whether `task` must wait, so that no two tasks train the same clean model: a backdoor fine-tuned from its
    (dataset, seed)'s clean model waits while that clean model's task is waiting or running, and while another
    fine-tuned model of the same (dataset, seed) is running (it trains the clean model when no task of this run
    does)."""
    ds = config.dataset(task.dataset)
    if not ds.fine_tuned(task.key):
        return False
    same = [t for t in waiting + running if (t.dataset, t.seed) == (task.dataset, task.seed) and t != task]
    return any(t.key == CLEAN_MODEL for t in same) or any(ds.fine_tuned(t.key) for t in same if t in running)


def task_resources(cluster: dict[str, float], device: str, cpus: int = 1, gpus: float | None = None
                   ) -> dict[str, float]:
    """What each model task asks Ray for: `cpus` CPUs (its torch threads), and `gpus` GPUs; by default one GPU
    when the cluster has one and the study's device is not "cpu" (a task's `device = "auto"` then finds the GPU
    Ray gives it, and tasks without one see none). Asking for GPUs the cluster lacks is a `ConfigError`."""
    from malex.errors import ConfigError

    check_workers(cpus, "--cpus-per-task")
    have = float(cluster.get("GPU", 0.0))
    if gpus is None:
        gpus = 1.0 if have >= 1 and device != "cpu" else 0.0
    elif not 0 <= gpus <= max(have, 0.0) or (gpus > 0 and device == "cpu"):
        raise ConfigError(f"--gpus-per-task {gpus}; the cluster has {have:g} GPU(s) and the study's device is "
                          f"{device!r}: expected 0..{have:g}, and 0 for device 'cpu'")
    return {"num_cpus": cpus, "num_gpus": float(gpus)}


def run_model_task(config: StudyConfig, out_dir: Path, task: ModelTask, threads: int = 1) -> TaskDone:
    """Compute the task's unfinished cells, then its model's analysis when this is the analysis seed and every
    attack on the model is on disk (what a Ray worker runs; plain Python, so it runs anywhere)."""
    import torch

    torch.set_num_threads(threads)
    started = time.time()
    study = Study(config, out_dir, progress=False)
    computed = []
    for attack in task.attacks:
        cell = Cell(task.dataset, attack, task.seed)
        if not study.cell_finished(cell):
            study.compute(cell)
            computed.append(cell)
    if config.analysis.enabled and task.seed == config.analysis_seed:
        study.analyse(task.dataset, task.key, make_missing=False)
    return TaskDone(task, tuple(computed), dict(study.counts), f"{socket.gethostname()}:{os.getpid()}", started,
                    time.time())


def run_study_on_ray(study: Study, config_text: str | None, address: str, workers: int,
                     select: Selection = Selection(), report: bool = True, cpus_per_task: int = 1,
                     gpus_per_task: float | None = None) -> tuple[StudyRun, list[TaskDone]]:
    """Run `study`'s (selected) grid as Ray tasks, at most `workers` at a time (each with `task_resources`), then
    its tables and report on this machine. Returns the run (cells computed by the tasks) and what each task did."""
    ray = import_ray()
    check_workers(workers, "--workers")
    check_workers(cpus_per_task, "--cpus-per-task")
    select.check(study.config)
    began = time.perf_counter()
    study.layout.claim(study.config.raw, study.config.base_dir, config_text)
    tasks = model_tasks(study.config, select)
    log = study.ctx.log
    started = start_ray(ray, address, workers)
    done: list[TaskDone] = []
    try:
        resources = task_resources(ray.cluster_resources(), study.config.device, cpus_per_task, gpus_per_task)
        log(f"each task asks for {resources['num_cpus']} CPU(s) and {resources['num_gpus']:g} GPU(s)")
        remote = ray.remote(**resources)(run_model_task)
        waiting, running = list(tasks), {}
        while waiting or running:
            while waiting and len(running) < workers:
                busy = list(running.values())
                task = next((t for t in waiting if not waits_for(t, waiting, busy, study.config)), None)
                if task is None:
                    break
                waiting.remove(task)
                running[remote.remote(study.config, study.layout.root, task, cpus_per_task)] = task
                log(f"{task.label}: started on Ray ({len(running)} running, {len(waiting)} waiting)")
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # a worker's malex error stays one line
                    cause = malex_cause(exc)
                    if cause is not None:
                        raise cause from exc
                    raise
                done.append(result)
                log(f"{task.label}: {len(result.computed)} cell(s) computed in {result.seconds:.1f} s on "
                    f"{result.worker}")
    finally:
        if started:
            ray.shutdown()
    run = study.run(config_text, report=report, select=select)  # every selected cell is on disk: tables, report
    computed = [c for d in done for c in d.computed]
    counts = {k: v + sum(d.counts.get(k, 0) for d in done) for k, v in run.counts.items()}
    return StudyRun(run.out_dir, run.cells, computed, [c for c in run.cells if c not in computed], counts,
                    time.perf_counter() - began, run.files), done
