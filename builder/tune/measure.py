"""Measuring tuning candidates: a closed-loop load generator and the search loop over candidates.

The caller serves each candidate: `serve(candidate)` is a context manager that renders the repository, starts
tritonserver and yields a sender factory (one sender per load thread; a sender sends one encoded image and
returns when the answer arrived). builder imports nothing above it, so the server and the client live in the
CLI (edgestack/tune_cli.py); tests can pass fakes.

Closed loop: `concurrency` threads each send their next image as soon as the previous answer arrived, for a
fixed time; throughput counts answers over the whole run, p50/p99 are of every answered request. A candidate
that fails to serve is recorded with its error and the search goes on.

On a shared machine one pass is noisy: with `rounds` > 1 the candidates are measured in that many passes, the
order reversed every other pass (so drift hits all alike), and per level the pass with the median throughput is
kept (of two, the better: what the configuration can do when the machine lets it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable

import numpy as np

from builder.tune.space import Candidate

Sender = Callable[[bytes], object]
SenderFactory = Callable[[], Sender]


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Trial:
    candidate: Candidate
    levels: tuple[Level, ...] = ()
    error: str = ""
    joules_per_inference: float | None = None

    def at(self, concurrency: int) -> Level | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.levels) and all(lv.errors == 0 and lv.requests > 0 for lv in self.levels)

    def to_dict(self) -> dict:
        return {"candidate": dataclasses.asdict(self.candidate), "label": self.candidate.label,
                "levels": [dataclasses.asdict(lv) for lv in self.levels], "error": self.error,
                "joules_per_inference": self.joules_per_inference}

    @classmethod
    def from_dict(cls, data: dict) -> "Trial":
        return cls(Candidate(**data["candidate"]), tuple(Level(**lv) for lv in data["levels"]), data.get("error", ""),
                   data.get("joules_per_inference"))


def closed_loop(make_sender: SenderFactory, images: list[bytes], concurrency: int, seconds: float,
                clock: Callable[[], float] = time.perf_counter) -> Level:
    """`concurrency` threads send back to back for `seconds`; throughput counts answers until all threads end."""
    if concurrency < 1 or seconds <= 0 or not images:
        raise ValueError(f"closed_loop: concurrency >= 1, seconds > 0 and images needed "
                         f"(got {concurrency}, {seconds}, {len(images)} images)")
    senders = [make_sender() for _ in range(concurrency)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(n: int) -> None:
        send, i, mine, failed = senders[n], n, [], 0
        start.wait()
        while clock() < stop_at[0]:
            t0 = clock()
            try:
                send(images[i % len(images)])
                mine.append(clock() - t0)
            except Exception:  # noqa: BLE001 - counted and reported
                failed += 1
            i += concurrency
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    began = clock()
    stop_at[0] = began + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = clock() - began
    for s in senders:
        close = getattr(s, "close", None)
        if close is not None:
            close()
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return Level(concurrency, len(latencies), errors[0], elapsed, len(latencies) / elapsed,
                 float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


@dataclass
class SearchSettings:
    concurrencies: tuple[int, ...] = (1, 4, 8)
    seconds: float = 5.0
    warmup_s: float = 1.0
    rounds: int = 1
    energy: Callable[[], ContextManager[Callable[[], float | None]]] | None = None  # optional, see tune_cli
    log: Callable[[str], None] = field(default=lambda line: None)


def measure_candidate(make_sender: SenderFactory, images: list[bytes], settings: SearchSettings) -> tuple[list[Level], float | None]:
    """Warm up at the highest concurrency, then each level in turn inside the energy window (joules or None)."""
    if settings.warmup_s > 0:
        closed_loop(make_sender, images, max(settings.concurrencies), settings.warmup_s)
    meter = settings.energy() if settings.energy else contextlib.nullcontext(lambda: None)
    with meter as joules_so_far:
        levels = [closed_loop(make_sender, images, c, settings.seconds) for c in settings.concurrencies]
        return levels, joules_so_far()


def merge_rounds(passes: list[Trial]) -> Trial:
    """One candidate's passes as one trial: per level the pass with the median throughput (upper median)."""
    failed = next((t for t in passes if not t.ok), None)
    if failed is not None:
        return failed
    levels = []
    for lv in passes[0].levels:
        ranked = sorted((t.at(lv.concurrency) for t in passes), key=lambda x: x.images_per_s)
        levels.append(ranked[len(ranked) // 2])
    joules = [t.joules_per_inference for t in passes if t.joules_per_inference is not None]
    return Trial(passes[0].candidate, tuple(levels), joules_per_inference=sorted(joules)[len(joules) // 2]
                 if joules else None)


def run_search(candidates: Iterable[Candidate], serve: Callable[[Candidate], ContextManager[SenderFactory]],
               images: list[bytes], settings: SearchSettings) -> list[Trial]:
    """Every candidate in settings.rounds passes (alternating order), merged per candidate."""
    candidates = list(candidates)
    passes: dict[Candidate, list[Trial]] = {c: [] for c in candidates}
    for r in range(max(settings.rounds, 1)):
        for trial in _one_pass(candidates if r % 2 == 0 else candidates[::-1], serve, images, settings):
            passes[trial.candidate].append(trial)
    return [merge_rounds(passes[c]) for c in candidates]


def _one_pass(candidates: list[Candidate], serve: Callable[[Candidate], ContextManager[SenderFactory]],
              images: list[bytes], settings: SearchSettings) -> list[Trial]:
    trials = []
    for n, candidate in enumerate(candidates, 1):
        try:
            with serve(candidate) as make_sender:
                levels, joules = measure_candidate(make_sender, images, settings)
            answered = sum(lv.requests for lv in levels)
            per = joules / answered if joules is not None and answered else None
            trial = Trial(candidate, tuple(levels), joules_per_inference=per)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be served is a result too
            trial = Trial(candidate, error=f"{type(exc).__name__}: {exc}")
        trials.append(trial)
        settings.log(f"[{n}] {candidate.label}: " + (trial.error or "  ".join(
            f"c{lv.concurrency} {lv.images_per_s:.2f} img/s p99 {lv.p99_ms:.0f} ms" for lv in trial.levels)))
    return trials
