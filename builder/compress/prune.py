"""Structured channel pruning of a TrainableCopy with Torch-Pruning's DepGraph.

DepGraph traces the copy once and groups every layer whose channels must go together (a convolution's output, the
depthwise convolution and the squeeze-excite convolutions after it, residual additions, concatenations in the
feature pyramid); a group loses the same channel indices everywhere. The heads' output convolutions (the class
heatmap and the size map, found by walking back from the copy's outputs) are ignored layers: their output channels
(80 classes, 4 box sides) are never pruned, their input channels are, with the tower before them.

Importance:
- "magnitude": Torch-Pruning's GroupMagnitudeImportance (L2 over every weight of the group, each layer's scores
  normalised by their mean): how much a channel weighs across all the layers it touches.
- "bn-scale": network slimming's |gamma| of the BatchNorm after the convolution (BNScaleImportance). The fixture's
  ONNX has its batchnorms already folded into the convolutions, so with_bn_scales puts them back: a ChannelScale
  (a BatchNorm2d that always uses its running statistics, so training does not change what it computes) after
  every convolution but the heads', gamma = the norm of the channel's weights and the weights divided by it, beta =
  the bias: the same function, the scale now a parameter. Untrained, bn-scale ranks channels by their own
  producing convolution's norm (magnitude looks at the whole group); a distillation trainer that adds an L1 penalty
  on the gammas (sparsity_loss) makes it network slimming proper. fold.fold_batchnorms folds them back before
  export.
- "activation" (ActivationImportance, needs images): a channel's share of the output variance of the convolutions
  reading it, measured on the given (training) images: what removing it, its mean compensated, costs. With
  scope="global" the channels of all groups are ranked together. At 5% without fine-tuning the heatmap logits keep a
  correlation of 0.91 (per group) / 0.98 (global) with the teacher's, magnitude 0.67: the weights carry the folded
  batchnorm scales, so magnitude says little, and many channels are nearly constant over images.

Torch-Pruning's grouping is exact on this graph, Concats included (test_every_group_removes_exactly_its_channels):
the collapse under magnitude importance was the choice of channels, not a wrongly coupled one.

Compensation (on by default, given images; builder/compress/compensate.py): a removed channel still added
something to the convolutions that read it. This detector's folded batchnorms left hundreds of channels whose
weights are ~0 and whose bias is not (up to 13.7): constant channels, the first any importance removes, and
removing them shifts every layer after (1% of the channels pruned without compensation: heatmap correlation 0.66).
"mean" folds each removed input channel's mean into the consumer's bias; "least-squares" also replaces it by its
linear regression on the channels kept, folded into the consumer's weights.

ratio: the fraction of each group's prunable channels removed (Torch-Pruning's pruning_ratio, uniform per group,
not global: no single layer is emptied). PruneResult counts what was removed, parameters and MACs before/after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from builder.compress import CompressError
from builder.compress.compensate import COMPENSATIONS, InputStats, compensate, input_stats
from builder.compress.torch_copy import HEAD_ROLES, TrainableCopy

IMPORTANCES = ("magnitude", "bn-scale", "activation")
RATIOS = (0.3, 0.5, 0.7)
SCOPES = ("group", "global")
MAX_LAYER_RATIO = 0.9  # global ranking never takes more than this fraction of one group's channels


class ChannelScale(torch.nn.BatchNorm2d):
    """A BatchNorm2d that always normalises with its running statistics (mean 0, var 1 - eps: a per-channel affine
    y = gamma * x + beta), in train mode too; Torch-Pruning prunes it and scores it as a batchnorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              False, 0.0, self.eps)


@dataclass(frozen=True)
class PruneSettings:
    """ratio: fraction of each group's prunable channels to remove, in (0, 1); importance: one of IMPORTANCES;
    round_to: keep channel counts multiples of this (None: exact ratio); compensate_bias: give the consumers back
    what the removed input channels added (needs images), by `compensation` (compensate.py); scope: "group"
    (the ratio of every group) or "global" (the ratio of all groups' channels together, the least important first,
    at most MAX_LAYER_RATIO of one group: meant for "activation", whose scores compare across groups)."""

    ratio: float
    importance: str = "magnitude"
    round_to: int | None = None
    compensate_bias: bool = True
    scope: str = "group"
    compensation: str = "mean"  # "mean" | "least-squares" (compensate.COMPENSATIONS, when compensate_bias)

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise CompressError(f"pruning ratio must be in (0, 1), got {self.ratio!r}")
        if self.importance not in IMPORTANCES:
            raise CompressError(f"pruning importance {self.importance!r} is not one of {IMPORTANCES}")
        if not isinstance(self.compensate_bias, bool):
            raise CompressError(f"compensate_bias must be True or False, got {self.compensate_bias!r}")
        if self.compensation not in COMPENSATIONS:
            raise CompressError(f"compensation {self.compensation!r} is not one of {COMPENSATIONS}")
        if self.scope not in SCOPES:
            raise CompressError(f"pruning scope {self.scope!r} is not one of {SCOPES}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise CompressError(f"round_to must be a positive integer or None, got {self.round_to!r}")

    @property
    def name(self) -> str:
        suffix = ("-global" if self.scope == "global" else "") + ("-lsq" if self.compensation == "least-squares" else "")
        return f"pruned{round(self.ratio * 100)}-{self.importance}{suffix}"


@dataclass
class PruneResult:
    """The pruned copy (a new TrainableCopy; the input copy is not changed) and what pruning did."""

    copy: TrainableCopy
    settings: PruneSettings
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    prunable_channels_before: int
    prunable_channels_after: int

    def to_dict(self) -> dict[str, Any]:
        removed = 1 - self.prunable_channels_after / self.prunable_channels_before
        return {"name": self.settings.name, "ratio": self.settings.ratio, "importance": self.settings.importance,
                "round_to": self.settings.round_to, "scope": self.settings.scope,
                "compensation": self.settings.compensation if self.settings.compensate_bias else "none",
                "params_before": self.params_before, "params_after": self.params_after,
                "params_reduction": 1 - self.params_after / self.params_before,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_reduction": 1 - self.macs_after / self.macs_before,
                "prunable_channels_before": self.prunable_channels_before,
                "prunable_channels_after": self.prunable_channels_after,
                "prunable_channels_removed": removed}


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def head_convolutions(copy: TrainableCopy) -> list[torch.nn.Conv2d]:
    """The convolutions producing the copy's outputs (walking back through parameter-free modules such as the size
    map's scalar multiplication): their output channels are the heads' and are never pruned."""
    body = copy.module.body
    graph = getattr(body, "graph", None)
    if graph is None:
        raise CompressError("the copy's body is not a torch.fx GraphModule (was it made by torch_copy.to_torch?)")
    found: list[torch.nn.Conv2d] = []
    output = next(n for n in graph.nodes if n.op == "output")
    pending = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    while pending:
        node = pending.pop()
        if getattr(node, "op", None) != "call_module":
            continue
        module = body.get_submodule(node.target)
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        if convs:
            found.append(convs[-1])
        elif not any(True for _ in module.parameters()):
            pending.extend(a for a in node.args if hasattr(a, "op"))
    if len(found) != len(copy.cut.heads):
        raise CompressError(f"found {len(found)} head convolutions for {len(copy.cut.heads)} heads")
    return found


def _scaled(conv: torch.nn.Conv2d) -> torch.nn.Sequential:
    scale = ChannelScale(conv.out_channels, eps=1e-5)
    with torch.no_grad():
        norms = conv.weight.detach().flatten(1).norm(dim=1)
        gamma = torch.where(norms > 0, norms, torch.ones_like(norms))
        conv.weight.div_(gamma.view(-1, 1, 1, 1))
        scale.weight.copy_(gamma)
        scale.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(gamma))
        scale.running_mean.zero_()
        scale.running_var.fill_(1.0 - scale.eps)
    conv.bias = None
    return torch.nn.Sequential(conv, scale)


def with_bn_scales(copy: TrainableCopy) -> int:
    """Put a ChannelScale after every convolution but the heads' (in place; same function up to float rounding).
    Returns how many were added; a copy that has them already gets none."""
    if any(isinstance(m, ChannelScale) for m in copy.module.modules()):
        return 0
    heads = {id(c) for c in head_convolutions(copy)}
    names = [n for n, m in copy.module.named_modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in heads]
    for name in names:
        _set_submodule(copy.module, name, _scaled(copy.module.get_submodule(name)))
    return len(names)


def sparsity_loss(module: torch.nn.Module) -> torch.Tensor:
    """Network slimming's penalty: the sum of |gamma| over every ChannelScale (0 when there are none). A trainer adds
    it with a small weight (e.g. 1e-4) so that bn-scale importance has unimportant channels to find."""
    terms = [m.weight.abs().sum() for m in module.modules() if isinstance(m, ChannelScale)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class ActivationImportance:
    """A channel's importance: the share of its consumers' output variance it carries, measured on images.

    Removing input channel c of an ungrouped convolution, its mean folded into the bias (bias compensation), changes
    the output by W[:, c] * (x_c - mean_c): an expected squared error of about ||W[:, c]||^2 * Var(x_c). Each
    convolution of the group losing input channels scores them by that, divided by the sum over all its input
    channels (a fraction of what it reads, so layers of different scales compare); a channel's score is the sum over
    the group. Unlike weight magnitude it sees the activations, which the folded batchnorms' scales make very
    unequal: a channel with large weights may be nearly constant (free to remove) and a small one carry the signal.
    """

    def __init__(self, stats: dict[int, InputStats], is_in_fn) -> None:
        self.stats = stats  # id(conv) -> its input channels' statistics, on the unpruned model
        self.is_in_fn = is_in_fn

    def __call__(self, group) -> torch.Tensor | None:
        root_channels = None
        scores: dict[int, float] = {}
        for dep, idxs in group:
            layer = dep.target.module
            if root_channels is None:
                root_channels = len(idxs)
            if (not isinstance(layer, torch.nn.Conv2d) or layer.groups != 1 or not self.is_in_fn(dep.handler)
                    or id(layer) not in self.stats):
                continue
            energy = layer.weight.detach().to(torch.float64).pow(2).sum(dim=(0, 2, 3)) * self.stats[id(layer)].variance
            total = float(energy.sum()) or 1.0
            for index in idxs:
                root = int(getattr(index, "root_idx", index))
                scores[root] = scores.get(root, 0.0) + float(energy[int(getattr(index, "idx", index))]) / total
        if root_channels is None:
            return None
        return torch.tensor([scores.get(i, 0.0) for i in range(root_channels)], dtype=torch.float32)


def _importance(name: str, stats=None, is_in_fn=None):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "activation":
        return ActivationImportance(stats, is_in_fn)
    return tp.importance.BNScaleImportance()


def _prunable_channels(module: torch.nn.Module, ignored: set[int]) -> int:
    return sum(m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in ignored)


def count_macs_params(copy: TrainableCopy) -> tuple[int, int]:
    """Torch-Pruning's count of multiply-accumulates and parameters of one image's forward pass, as served: on a
    clone with its batchnorms (ChannelScales) folded."""
    import copy as copy_module

    import torch_pruning as tp

    from builder.compress.fold import fold_batchnorms

    module = copy.module
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()):
        module = copy_module.deepcopy(module)
        fold_batchnorms(module)
    example = torch.zeros(copy.input_shape(1))
    module.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, example)
    return int(macs), int(params)


def clone(copy: TrainableCopy) -> TrainableCopy:
    import copy as copy_module

    return TrainableCopy(copy_module.deepcopy(copy.module), copy.cut, dict(copy.rewrites))


def prune(copy: TrainableCopy, settings: PruneSettings, images_nhwc=None) -> PruneResult:
    """A pruned clone of the copy (bn-scale importance adds ChannelScales first, see with_bn_scales).

    images_nhwc: served-layout images [N, H, W, 3] for bias compensation (settings.compensate_bias); None: none."""
    import numpy as np
    import torch_pruning as tp

    from builder.compress.torch_copy import nhwc_to_input

    if settings.compensate_bias and images_nhwc is None:
        raise CompressError(f"{settings.name}: bias compensation needs images (or compensate_bias=False)")
    if settings.importance == "activation" and images_nhwc is None:
        raise CompressError(f"{settings.name}: activation importance needs images")
    pruned = clone(copy)
    if settings.importance == "bn-scale":
        with_bn_scales(pruned)
    heads = head_convolutions(pruned)
    ignored = {id(c) for c in heads}
    macs_before, params_before = count_macs_params(pruned)
    channels_before = _prunable_channels(pruned.module, ignored)
    example = torch.zeros(pruned.input_shape(1))
    stats: dict[int, InputStats] = {}
    if images_nhwc is not None and (settings.compensate_bias or settings.importance == "activation"):
        stats = input_stats(pruned.module, torch.from_numpy(nhwc_to_input(np.asarray(images_nhwc))),
                            covariance=settings.compensate_bias and settings.compensation == "least-squares")
    compensated = dict(stats) if settings.compensate_bias else {}  # kept in step with the pruned channels
    pruned.module.eval()
    try:
        importance = _importance(settings.importance, stats)
        pruner = tp.pruner.MetaPruner(pruned.module, example, importance=importance,
                                      pruning_ratio=settings.ratio, ignored_layers=heads, round_to=settings.round_to,
                                      global_pruning=settings.scope == "global",
                                      max_pruning_ratio=MAX_LAYER_RATIO)
        if isinstance(importance, ActivationImportance):
            importance.is_in_fn = pruner.DG.is_in_channel_pruning_fn
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                if compensated:
                    compensate(group, compensated, pruner.DG.is_out_channel_pruning_fn, settings.compensation)
                group.prune()
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise CompressError(f"Torch-Pruning could not prune ({settings.name}): {type(exc).__name__}: {exc}") from exc
    macs_after, params_after = count_macs_params(pruned)
    with torch.no_grad():
        outputs = pruned.module(example)
    for role, out in zip(HEAD_ROLES, outputs):
        if tuple(out.shape[1:]) != tuple(pruned.cut.head_shapes[role][1:]):
            raise CompressError(f"pruning changed head {role}: {tuple(out.shape)} instead of "
                                f"{pruned.cut.head_shapes[role]}")
    return PruneResult(pruned, settings, params_before, params_after, macs_before, macs_after, channels_before,
                       _prunable_channels(pruned.module, ignored))
