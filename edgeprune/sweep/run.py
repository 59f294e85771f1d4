"""Running a sweep: each setting rewritten, evaluated and timed once, boards sharing the work.

One worker thread per ``--device`` takes the next unfinished setting from a shared queue and
runs it to the end (one setting per board at a time)::

    setting -> rewrite (OUT/models/<id>.onnx; kept, reused when resuming)
            -> evaluate on the host (ONNX Runtime CPU, edgeprune.evaluation: mAP, NDS)
            -> time on the worker's board, interleaved with the unpruned baseline in one request
               (edgeprune.runners.bench.run_bench: the speedup is paired, immune to load drift)
            -> OUT/results/<id>.json

Host work (rewrites and evaluation) takes one lock, and so does timing on a ``local`` device:
a measurement never shares this machine's cores with another setting's rewrite or
evaluation. On SSH boards the host evaluates the next setting while a board times its
current one. Accuracy is the host's (CPU) figure for the file the board runs; latency is the
board's. The timing runs are not reused for the evaluation: the agent times one input set
(seeded or ``.npz``) and the evaluation needs every scene, so a setting costs about
``scenes + 2 * (warmup + repeats)`` inferences (default 24 for the timing).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from edgeprune.errors import ParameterError
from edgeprune.runners.bench import BenchOptions, run_bench, with_device_defaults
from edgeprune.runners.results import ModelSpec
from edgeprune.sweep.settings import BASELINE, Setting
from edgeprune.sweep.store import SweepStore

log = logging.getLogger(__name__)

BASE = Setting(BASELINE, precision="fp32")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SweepOptions:
    """What is measured, the same for every setting (part of the sweep's identity)."""

    data: str
    timing: BenchOptions = BenchOptions(warmup=2, repeats=10)
    limit: int | None = None            # evaluate the first N scenes only

    def identity(self, model_sha256: str) -> dict[str, Any]:
        t = self.timing
        return {"model_sha256": model_sha256, "data": str(Path(self.data).resolve()), "limit": self.limit,
                "warmup": t.warmup, "repeats": t.repeats, "time_budget_s": t.time_budget_s, "threads": t.threads,
                "inputs_seed": t.seed}


def check_data(model: str | Path, data: str | Path) -> None:
    """Fail before any rewrite when the dataset cannot be read or the model cannot run on its images."""
    from edgeprune.data.format import load_dataset
    from edgeprune.evaluation.inference import check_image_size, image_input
    from edgeprune.export.validate import ort_session

    dataset = load_dataset(data)
    _, shape = image_input(ort_session(model), model)
    check_image_size(shape, dataset, model)


def check_devices(devices: Sequence[Any]) -> list[Any]:
    """Device profiles sharing the work: distinct boards of one kind (transport, providers, threads)."""
    from edgeprune.devices.profile import load_profile

    profiles = [load_profile(d) for d in devices] or [load_profile("local")]
    names = [p.name for p in profiles]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ParameterError(f"--device {twice[0]} is given twice; a board times one setting at a time, so give "
                             "each board once (a second board needs its own profile)")
    kinds = {(p.transport, tuple((n, tuple(sorted(o.items()))) for n, o in p.providers), p.threads) for p in profiles}
    if len(kinds) > 1:
        raise ParameterError(f"--device {', '.join(names)} are not of one kind (transport, providers or threads "
                             "differ); their latencies would not be comparable: sweep each kind separately")
    return profiles


class _Stopped(BaseException):
    """Raised in a worker by its progress callbacks once the sweep stops (a BaseException: the
    in-process agent answers every Exception with an error result, this must pass through)."""


@dataclass
class SweepJob:
    """The shared state of one sweep run: the queue, the host lock, the first failure."""

    model: Path
    store: SweepStore
    options: SweepOptions
    todo: "queue.Queue[Setting]" = field(default_factory=queue.Queue)
    host: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    done: int = 0

    # ------------------------------------------------------------------ one setting
    def rewritten(self, setting: Setting) -> Path:
        """The setting's model file: made once (atomically), reused by a resumed sweep."""
        from edgeprune.passes.driver import rewrite

        path = self.store.model(setting.id)
        if not path.is_file():
            rewrite(self.model, path, setting.passes(), precision=setting.precision, verify=False)
        return path

    def run_setting(self, setting: Setting, runner: Any) -> None:
        from edgeprune.evaluation.evaluate import evaluate_model

        started = time.perf_counter()
        with self.host:
            path = self.rewritten(setting)
            rewritten = time.perf_counter()
            metrics = evaluate_model(path, self.options.data, limit=self.options.limit, progress=self.check_stop)
        evaluated = time.perf_counter()
        timing = self.time(setting, path, runner)
        result = {"setting": setting.to_dict(), "model": str(path.relative_to(self.store.root)),
                  "mAP": metrics.mean_ap, "NDS": metrics.nds, "class_ap": metrics.class_ap,
                  "num_scenes": metrics.num_samples, **timing,
                  "seconds": {"rewrite": rewritten - started, "evaluate": evaluated - rewritten,
                              "time": time.perf_counter() - evaluated}}
        self.store.write_result(setting.id, result)
        log.info("%s: mAP %.4f, %.2f ms (%.2fx) on %s", setting.id, metrics.mean_ap, timing["latency_ms"]["median"],
                 timing["speedup"]["ratio"], timing["device"])

    def time(self, setting: Setting, path: Path, runner: Any) -> dict[str, Any]:
        """Latency of ``path`` on the worker's board, in one interleaved request with the baseline."""
        base = ModelSpec(BASE.id, str(self.store.model(BASE.id)), "fp32")
        specs = [base] if setting == BASE else [base, ModelSpec(setting.id, str(path), setting.precision)]
        options = with_device_defaults(self.options.timing, runner.profile)
        local = runner.profile.transport == "local"
        with self.host if local else contextlib.nullcontext():
            report = run_bench(specs, options, runner)
        stats, base_stats = report.models[-1].stats, report.models[0].stats
        ratio = report.speedups[0] if report.speedups else None
        return {"device": runner.profile.name,
                "latency_ms": {"median": stats.median, "ci_low": stats.ci_low, "ci_high": stats.ci_high,
                               "n": stats.n},
                "baseline_ms": base_stats.median,
                "speedup": {"ratio": ratio.ratio if ratio else 1.0, "ci_low": ratio.ci_low if ratio else 1.0,
                            "ci_high": ratio.ci_high if ratio else 1.0}}

    # ------------------------------------------------------------------ workers
    def check_stop(self, _done: int = 0, _total: int = 0) -> None:
        """Progress callback of evaluation and timing: ends the worker's step within one inference."""
        if self.stop.is_set():
            raise _Stopped()

    def worker(self, profile: Any, exited: threading.Event) -> None:
        """Take settings until the queue is empty, a worker failed, or the sweep was interrupted;
        set ``exited`` at the end (what the main thread waits for, see :func:`run_sweep`)."""
        from edgeprune.runners.factory import get_runner

        try:
            with get_runner(profile, progress=self.check_stop) as runner:
                while not self.stop.is_set():
                    try:
                        setting = self.todo.get_nowait()
                    except queue.Empty:
                        return
                    self.run_setting(setting, runner)
                    self.done += 1
        except _Stopped:
            pass
        except BaseException as exc:          # handed to the main thread, which raises it
            self.errors.append(exc)
            self.stop.set()
        finally:
            exited.set()


def run_sweep(model: str | Path, grid: Sequence[Setting], out: str | Path, options: SweepOptions,
              devices: Sequence[Any] = ("local",), progress: Progress | None = None) -> SweepStore:
    """Run every setting of ``grid`` not finished in ``out``; returns the store holding all results.

    The baseline is rewritten first (every timing request pairs with it). Raises the first
    worker's error after all workers stopped; on Ctrl-C, workers stop after their current
    step and finished settings stay.
    """
    from edgeprune.runners.ssh_link import sha256_file

    profiles = check_devices(devices)
    store = SweepStore.open(out, options.identity(sha256_file(model)))
    job = SweepJob(Path(model), store, options)
    job.rewritten(BASE)
    pending = [s for s in grid if not store.finished(s.id)]
    finished = len(grid) - len(pending)
    if finished:
        log.info("resuming %s: %d of %d settings already finished", out, finished, len(grid))
    for setting in pending:
        job.todo.put(setting)
    exits = [threading.Event() for _ in profiles[:len(pending)]]
    for profile, exited in zip(profiles, exits):
        threading.Thread(target=job.worker, args=(profile, exited), name=f"sweep-{profile.name}", daemon=True).start()
    # Waiting on events, not Thread.join: a join interrupted by Ctrl-C/SIGTERM marks a thread that
    # is still running as finished (CPython 3.11), and the interpreter then exits under a worker
    # inside ONNX Runtime, which aborts the process.
    try:
        while not all(e.is_set() for e in exits):
            next(e for e in exits if not e.is_set()).wait(timeout=0.2)
            if progress is not None:
                progress(finished + job.done, len(grid))
    except BaseException:                     # Ctrl-C, SIGTERM: workers stop within one inference
        job.stop.set()
        for exited in exits:
            exited.wait(timeout=60)
        raise
    if job.errors:
        raise job.errors[0]
    return store
