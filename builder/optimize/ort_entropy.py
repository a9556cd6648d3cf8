"""Entropy (KL-divergence) activation ranges with ONNX Runtime's own histograms, for build_int8's `entropy`.

quantize_static cannot pass num_bins to ORT's EntropyCalibrater, which then uses 128 histogram bins and 128
quantized bins: its KL search has one candidate, the whole histogram, and the result is min/max (byte-identical
models on the fixture detector). Here ORT's calibrator collects its histograms with num_bins bins and the KL search
of EntropyCalibrater.get_entropy_threshold picks the range; build_int8 hands the ranges to quantize_static as
TensorQuantOverrides. kl_threshold is that search with the per-bin Python loops of ORT 1.22 replaced by array
operations (same candidates, same arithmetic, same result: tested against ORT's): ORT's own loops take minutes
for the fixture detector's ~450 tensors.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

DEFAULT_NUM_BINS = 2048  # TensorRT's and ORT's Percentile default
DEFAULT_QUANTIZED_BINS = 128


def kl_threshold(hist: np.ndarray, edges: np.ndarray, low: float, high: float,
                 num_quantized_bins: int = DEFAULT_QUANTIZED_BINS) -> tuple[float, float]:
    """ORT's EntropyCalibrater.get_entropy_threshold: the symmetric window of the histogram whose quantization to
    num_quantized_bins bins loses the least information (KL divergence), clipped to the observed [low, high].

    Every candidate window is a row of an array (zero-padded to the longest window of its block of rows), so the
    search runs as array operations instead of ORT's per-candidate, per-bin Python loops. Like ORT's: p is the window
    with the outliers added to its end bins; q spreads each quantized bin's count (integer division) over its
    nonzero positions of p; both are smoothed (quant_utils.smooth_distribution) and compared with scipy's entropy.
    The candidates go in blocks of rows of similar length (windows grow by 2 bins a row): padding every row to the
    longest window would double the work and the memory.
    """
    hist = np.asarray(hist, dtype=np.float64)
    num_bins, zero, half = hist.size, hist.size // 2, num_quantized_bins // 2
    rows = np.arange(zero + 1 - half)
    start = zero - half - rows
    end = np.minimum(zero + half + rows + 1, num_bins)
    cumulative = np.concatenate(([0.0], np.cumsum(hist)))
    block = max(1, _BLOCK_ELEMENTS // num_bins)
    div = np.concatenate([_divergences(hist, cumulative, start[i:i + block], end[i:i + block], num_quantized_bins)
                          for i in range(0, len(rows), block)])
    best = int(np.argmin(div))  # the first of equal minima, as ORT's np.argmin
    return float(max(edges[start[best]], low)), float(min(edges[end[best]], high))


_BLOCK_ELEMENTS = 1 << 17  # candidate rows per block: about this many window bins (blocks of 64 rows at 2048 bins)


def _divergences(hist: np.ndarray, cumulative: np.ndarray, start: np.ndarray, end: np.ndarray,
                 num_quantized_bins: int) -> np.ndarray:
    """The KL divergence (float32, as ORT's) of the candidate windows [start, end) of the histogram."""
    from scipy.special import rel_entr

    num_bins = hist.size
    rows = np.arange(len(start))
    length = end - start
    merged = length // num_quantized_bins
    covered = num_quantized_bins * merged
    j = np.arange(int(length.max()))[None, :]
    valid = j < length[:, None]
    sliced = np.where(valid, hist[np.minimum(start[:, None] + j, num_bins - 1)], 0.0)
    p = sliced.copy()
    p[:, 0] += cumulative[start]
    p[rows, length - 1] += cumulative[-1] - cumulative[end]
    in_cover = j < covered[:, None]
    # quantized bin of each position: j // merged over the covered part, the last bin for the tail
    bins = np.where(in_cover, j // merged[:, None], num_quantized_bins - 1) + rows[:, None] * num_quantized_bins
    size = len(rows) * num_quantized_bins
    quantized = np.bincount(bins[valid], weights=sliced[valid], minlength=size)
    norm = np.bincount(bins[in_cover], weights=(p != 0)[in_cover], minlength=size)
    per_bin = np.floor(np.divide(quantized, norm, out=np.zeros_like(quantized), where=norm != 0))
    q = np.where(in_cover, per_bin[bins], 0.0)
    ps, qs = _smooth(p, valid), _smooth(q, valid)
    with np.errstate(divide="ignore", invalid="ignore"):
        pn = ps / _row_sums(ps, length)[:, None]
        qn = qs / _row_sums(qs, length)[:, None]
        div = _row_sums(rel_entr(pn, qn), length).astype(np.float32)
    div[~(np.any((p != 0) & valid, axis=1) & np.any((q != 0) & valid, axis=1))] = np.inf
    return div


def _row_sums(a: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Each row's sum over its own window only, as ORT sums each candidate's 1-D array: numpy's pairwise summation
    groups the terms by the array's length, so a sum over the zero-padded row could round differently (float32) and
    tip the argmin between near-equal candidates."""
    return np.array([row[:n].sum() for row, n in zip(a, length.tolist())], dtype=a.dtype)


def _smooth(p: np.ndarray, valid: np.ndarray, eps: float = 0.0001) -> np.ndarray:
    """quant_utils.smooth_distribution of each row's valid part (float32, as ORT's); padding stays 0."""
    zeros = (p == 0) & valid
    n_zeros = zeros.sum(axis=1, keepdims=True)
    n_nonzeros = valid.sum(axis=1, keepdims=True) - n_zeros
    eps1 = (eps * n_zeros / np.maximum(n_nonzeros, 1)).astype(np.float32)
    smoothed = p.astype(np.float32) + np.where(zeros, np.float32(eps), -eps1)
    smoothed[~valid] = 0
    return smoothed


def entropy_ranges(prepared: Path, batches: Iterable[dict[str, np.ndarray]], op_types: list[str],
                   num_bins: int = DEFAULT_NUM_BINS,
                   num_quantized_bins: int = DEFAULT_QUANTIZED_BINS) -> dict[str, tuple[float, float]]:
    """{tensor: (low, high)} for every tensor ORT's calibrator selects for these op types, from its histograms."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(batches)

        def get_next(self):
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory(prefix="entropy-") as tmp:
        calibrator = create_calibrator(Path(prepared), op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       providers=["CPUExecutionProvider"],
                                       extra_options={"num_bins": num_bins, "num_quantized_bins": num_quantized_bins})
        calibrator.collect_data(Reader())
        histograms = calibrator.collector.histogram_dict
    return {name: kl_threshold(hist, edges, float(low), float(high), num_quantized_bins)
            for name, (hist, edges, low, high, _) in sorted(histograms.items())}
