"""The tuning search space: candidate target overrides for one spec's target.

A Candidate is a set of overrides accepted by builder.repository.target_for (and so by `edgestack build
--detector-instances N --intra-op-threads N --max-batch-size N`). Thread counts are always explicit: a
candidate never leaves ONNX Runtime or OpenVINO to choose (0 would mean "the runtime decides").

On the `intel` target each detector instance runs OpenVINO (backends/detector/openvino_runner.py): one stream with
all its threads for a single image, and with `detector_streams` > 1 that many streams for a batch of several images
(one image per stream), so a single instance can serve one camera and a busy server alike. A search
over several CPU targets (`targets`) compares the runtimes too: ONNX Runtime (`cpu`) against OpenVINO (`intel`),
the same FP32 model in both.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from builder.errors import TargetError

CPU_TARGETS = ("cpu", "intel")


@dataclass(frozen=True)
class Candidate:
    detector_instances: int
    intra_op_threads: int
    max_batch_size: int = 8
    max_queue_delay_us: int = 0
    preprocess_instances: int | None = None  # None: the builder's rule (detector instances + 1)
    postprocess_instances: int = 1
    intra_op_spinning: bool = False  # ONNX Runtime's busy-waiting threads (only matters with 2 threads or more)
    target: str | None = None  # None: the spec's target
    detector_streams: int = 1  # OpenVINO streams per detector instance (intel)

    def __post_init__(self) -> None:
        if not isinstance(self.intra_op_spinning, bool):
            raise TargetError(f"tune candidate: intra_op_spinning must be true or false, got {self.intra_op_spinning!r}")
        if self.target is not None and self.target not in CPU_TARGETS:
            raise TargetError(f"tune candidate: target {self.target!r} is not one of the CPU targets {CPU_TARGETS}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("intra_op_spinning", "target"):
                continue
            low = 0 if f.name == "max_queue_delay_us" else 1
            if not isinstance(value, int) or value < low:
                raise TargetError(f"tune candidate: {f.name} must be an integer >= {low}, got {value!r}")

    def overrides(self) -> dict[str, int | None]:
        """Keyword arguments for builder.repository.target_for (the target itself is the spec's: see `spec_for`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "target"}

    def spec_for(self, spec):
        """The spec with this candidate's target (the spec itself when the candidate names none)."""
        return spec if self.target is None else spec.replace(target=self.target)

    @property
    def label(self) -> str:
        pre = "auto" if self.preprocess_instances is None else self.preprocess_instances
        spin = " spin" if self.intra_op_spinning else ""
        on = f"{self.target}: " if self.target else ""
        streams = f" {self.detector_streams}s" if self.detector_streams > 1 else ""
        return (f"{on}det {self.detector_instances}x{self.intra_op_threads}t{spin}{streams}, batch {self.max_batch_size} "
                f"delay {self.max_queue_delay_us}us, pre {pre}, post {self.postprocess_instances}")

    def build_flags(self) -> str:
        """The `edgestack build` options for the knobs it has."""
        on = f"--target {self.target} " if self.target else ""
        return (f"{on}--detector-instances {self.detector_instances} --intra-op-threads {self.intra_op_threads} "
                f"--max-batch-size {self.max_batch_size}" + (" --intra-op-spinning" if self.intra_op_spinning else "")
                + (f" --detector-streams {self.detector_streams}" if self.detector_streams > 1 else ""))


@dataclass(frozen=True)
class SearchSpace:
    detector_instances: tuple[int, ...]
    intra_op_threads: tuple[int, ...]
    max_batch_size: tuple[int, ...] = (8,)
    max_queue_delay_us: tuple[int, ...] = (0,)
    preprocess_instances: tuple[int | None, ...] = (None,)
    postprocess_instances: tuple[int, ...] = (1,)
    intra_op_spinning: tuple[bool, ...] = (False,)
    max_threads: int | None = None  # skip candidates whose instances x threads exceed this
    targets: tuple[str | None, ...] = (None,)  # None: the spec's target
    detector_streams: tuple[int, ...] = (1,)  # OpenVINO streams per instance (intel only)

    def candidates(self) -> list[Candidate]:
        out = []
        for target, det, threads, batch, delay, pre, post, spin, streams in itertools.product(
                self.targets, self.detector_instances, self.intra_op_threads, self.max_batch_size,
                self.max_queue_delay_us, self.preprocess_instances, self.postprocess_instances, self.intra_op_spinning,
                self.detector_streams):
            if self.max_threads is not None and det * threads > self.max_threads:
                continue
            if batch == 1 and delay > 0:  # nothing to batch: the delay only adds latency
                continue
            if spin and (threads == 1 or target == "intel"):  # one thread has no pool to spin; OpenVINO no knob
                continue
            if streams > 1 and (streams > threads or batch == 1 or target == "cpu"):  # a thread per stream, a batch
                continue  # to spread over them, and OpenVINO's
            out.append(Candidate(det, threads, batch, delay, pre, post, spin, target, streams))
        if not out:
            raise TargetError(f"tune: the search space is empty (max_threads {self.max_threads}): {self}")
        return out


def default_space(target: str, cores: int, quick: bool = False) -> SearchSpace:
    """A small grid for a CPU target on `cores` cores: one image using every core, one instance per core,
    and the mixes between, with and without a short batching delay, multi-threaded instances with and without
    spinning threads (cpu target: spinning wins with the cores to itself, loses once they are shared); `quick`
    keeps the corners only."""
    if target not in CPU_TARGETS:
        raise TargetError(f"tune: target {target!r} is not tuned on this device; CPU targets: {CPU_TARGETS} "
                          "(a GPU target's knobs are TensorRT's: see docs/GPU_CHECK.md)")
    cores = max(cores, 1)
    levels = tuple(sorted({1, cores}))
    if quick:
        return SearchSpace(levels, levels, max_threads=cores)
    spinning = (False, True) if target == "cpu" else (False,)
    streams = levels if target == "intel" else (1,)
    return SearchSpace(detector_instances=levels, intra_op_threads=levels, max_queue_delay_us=(0, 2000),
                       intra_op_spinning=spinning, max_threads=2 * cores, detector_streams=streams)


def parse_levels(text: str, name: str, allow_auto: bool = False) -> tuple:
    """'1,2,4' -> (1, 2, 4); 'auto' allowed where the builder has its own rule. Errors name the option."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if allow_auto and part == "auto":
            values.append(None)
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise TargetError(f"tune: {name}: {part!r} is not an integer") from None
    if not values:
        raise TargetError(f"tune: {name}: no value given")
    return tuple(values)
