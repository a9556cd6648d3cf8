"""Compression of a served detector (issue #15): a trainable PyTorch copy, structured pruning, batchnorm folding,
export back to the served interface. The distillation trainer and `edgestack compress` build on this API.

The parts, one module each (torch is imported only inside them, never by `import builder.compress`):

- torch_copy: find_head_cut(source) -> HeadCut (where the trainable part starts and ends: after the input's
  NHWC->NCHW Transpose, at the heads' raw NCHW maps before the decode tail); to_torch(source) -> TrainableCopy
  (onnx2torch with this project's converter for the `asymmetric` linear Resize); check_equality(copy, batch)
  -> EqualityReport (max abs difference and correlation per head against ONNX Runtime on the same cut).
  TrainableCopy.module(x) takes float32 NCHW [N, 3, H, W] (raw 0..255, like the served input) and returns a tuple
  in HEAD_ROLES order: (heatmap_logits [N, C, h, w] before the Sigmoid, wh [N, 4, h, w] as served, in input
  pixels). nhwc_to_input(batch) turns a served-layout batch [N, H, W, 3] into that input.
- prune: with_bn_scales(module) puts a BatchNorm2d after every convolution (identity in value: gamma = the
  channel's weight norm), prune(copy, PruneSettings(ratio, importance)) -> PruneResult (Torch-Pruning DepGraph,
  ratio of prunable channels 0.3/0.5/0.7, importance "magnitude" or "bn-scale"; the heads' output convolutions
  are never pruned). A pruned copy is still a TrainableCopy: the trainer fine-tunes `result.copy.module`.
- fold: fold_batchnorms(module) folds every BatchNorm2d into the convolution before it (in place, exact up to
  float rounding); export calls it, so zero channels and BN layers cost nothing when served.
- export: export_student(copy, out_dir) -> Path of model.onnx (opset 17) with the source model's input layout
  Transpose and decode tail re-attached: the served interface (names, shapes, dtypes) is the source's, checked
  by onnx.checker and against the PyTorch output; build_student_variant(...) writes a variant folder (fp32 or
  INT8 by the builder's device-class-aware recipe) that `edgestack build --variant DIR` serves.

Every error raised on purpose is a CompressError (a BuilderError): the CLI reports it once.
"""
from __future__ import annotations

from builder.errors import BuilderError


class CompressError(BuilderError):
    """A model cannot be converted, pruned, folded or exported as asked."""


def set_torch_threads(threads: int) -> None:
    """Set PyTorch's intra-op and inter-op thread counts explicitly (call before any torch work)."""
    import torch

    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise CompressError(f"torch threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before the first parallel work; the intra-op count is what matters
        pass
