"""What a convolution loses when its input channels are pruned, given back from the channels it keeps.

Measured once on the unpruned copy, on training images: each ungrouped convolution's input statistics (per channel
mean and variance; for "least-squares" also the channels' covariance). Before a group is pruned, each convolution
losing input channels R (keeping K) is corrected:

- "mean" (bias compensation): the removed channels are replaced by their means, sum_k W[:, r, k] * mean(x_r) added
  to the bias. Exact for a constant channel (hundreds in this detector: folded batchnorms left weights ~0 and
  biases that are not).
- "least-squares" (the reconstruction of channel pruning, He et al. 2017, in closed form): the removed channels are
  replaced by their linear regression on the kept ones, x_R ~ A^T x_K + b (ridge-regularised normal equations on
  the covariance), folded into the weights and bias: W[:, K] += A W[:, R], bias += W[:, R] b. A convolution is
  linear in its input channels, so the substitution holds at every pixel for any kernel size (away from the zero
  padding); it is the mean compensation when the removed channels are uncorrelated with the kept ones.

The statistics are taken on the unpruned copy and kept in step with each pruned group's indices (the channels a
convolution still reads); no fine-tuning is involved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COMPENSATIONS = ("mean", "least-squares")  # compensate_bias=False: none
RIDGE = 1e-4  # of the kept channels' mean variance, added to the covariance's diagonal


@dataclass
class InputStats:
    """One convolution's input channels over the images and positions: mean, variance and (optionally) the
    covariance matrix, float64."""

    mean: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor | None = None

    def keep(self, kept: torch.Tensor) -> "InputStats":
        cov = self.covariance[kept][:, kept] if self.covariance is not None else None
        return InputStats(self.mean[kept], self.variance[kept], cov)


def input_stats(module: torch.nn.Module, batch: torch.Tensor, covariance: bool = False) -> dict[int, InputStats]:
    """id(conv) -> InputStats of every ungrouped convolution's input, over the images of batch (NCHW)."""
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    sums: dict[int, list] = {}

    def hook(conv, args):
        x = args[0].detach().to(torch.float64)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, N*H*W]
        moments = [flat.mean(dim=1), flat.pow(2).mean(dim=1)]
        moments.append(flat @ flat.T / flat.shape[1] if covariance else None)
        if id(conv) in sums:
            sums[id(conv)] = [a + b if a is not None else None for a, b in zip(sums[id(conv)], moments)]
        else:
            sums[id(conv)] = moments

    handles = [c.register_forward_pre_hook(hook) for c in convs]
    try:
        module.eval()
        with torch.no_grad():
            for image in batch:
                module(image[None])
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for key, (first, second, outer) in sums.items():
        mean = first / len(batch)
        cov = outer / len(batch) - torch.outer(mean, mean) if outer is not None else None
        stats[key] = InputStats(mean, (second / len(batch) - mean.pow(2)).clamp(min=0.0), cov)
    return stats


def regression(stats: InputStats, removed: list[int], kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [K, R], b [R]) with x_R ~ A^T x_K + b in the least-squares sense over the measured inputs."""
    cov = stats.covariance
    assert cov is not None
    c_kk = cov[kept][:, kept]
    ridge = RIDGE * float(torch.diagonal(c_kk).mean().clamp(min=1e-12))
    a = torch.linalg.solve(c_kk + ridge * torch.eye(len(kept), dtype=cov.dtype), cov[kept][:, removed])
    b = stats.mean[removed] - a.T @ stats.mean[kept]
    return a, b


def compensate(group, stats: dict[int, InputStats], is_out_fn, method: str) -> None:
    """Correct every ungrouped convolution of the group that loses input channels (see the module docstring), then
    drop those channels from its statistics."""
    for dep, idxs in group:
        layer = dep.target.module
        if (not isinstance(layer, torch.nn.Conv2d) or layer.groups != 1 or is_out_fn(dep.handler)
                or id(layer) not in stats):
            continue
        removed = sorted({int(getattr(i, "idx", i)) for i in idxs})
        own = stats[id(layer)]
        keep = torch.ones(len(own.mean), dtype=torch.bool)
        keep[removed] = False
        kept = torch.nonzero(keep).flatten().tolist()
        with torch.no_grad():
            weight = layer.weight.detach().to(torch.float64)
            if method == "least-squares" and own.covariance is not None and kept:
                a, b = regression(own, removed, kept)
                moved = torch.einsum("kr,orhw->okhw", a, weight[:, removed])
                layer.weight[:, kept] += moved.to(layer.weight.dtype)
                shift = (weight[:, removed].sum(dim=(2, 3)) * b).sum(dim=1)
            else:
                shift = (weight[:, removed].sum(dim=(2, 3)) * own.mean[removed]).sum(dim=1)
            if layer.bias is None:
                layer.bias = torch.nn.Parameter(torch.zeros(layer.out_channels, dtype=layer.weight.dtype))
            layer.bias.add_(shift.to(layer.weight.dtype))
        stats[id(layer)] = own.keep(keep)
