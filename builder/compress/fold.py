"""Batchnorm folded into the convolution before it, so a served student has no normalisation layers.

For a convolution W, b followed by a batchnorm (gamma, beta, running mean mu, running var var, eps) in eval mode:
    s = gamma / sqrt(var + eps);   W' = W * s (per output channel);   b' = (b - mu) * s + beta
The pair becomes the one convolution W', b' (the batchnorm is replaced by Identity): the same function up to float
rounding, and no channel costs anything beyond its convolution. Pairs are found where prune.with_bn_scales puts
them (a Sequential whose convolution is followed by a BatchNorm2d, ChannelScale included) and in a torch.fx graph
(a batchnorm module whose only input is a convolution module used by nothing else).
"""
from __future__ import annotations

import torch

from builder.compress import CompressError


def fold_pair(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """Fold bn into conv in place (conv gains a bias if it had none)."""
    if conv.out_channels != bn.num_features:
        raise CompressError(f"cannot fold a batchnorm of {bn.num_features} channels into a convolution with "
                            f"{conv.out_channels} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise CompressError("cannot fold a batchnorm without running statistics (track_running_stats=False)")
    with torch.no_grad():
        scale = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)) \
            / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        folded = (bias - bn.running_mean) * scale + shift
        conv.bias = torch.nn.Parameter(folded.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _fold_sequentials(module: torch.nn.Module) -> int:
    folded = 0
    for parent in module.modules():
        if not isinstance(parent, torch.nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                fold_pair(conv, bn)
                parent._modules[second] = torch.nn.Identity()
                folded += 1
    return folded


def _fold_fx(module: torch.nn.Module) -> int:
    folded = 0
    for graph_module in module.modules():
        graph = getattr(graph_module, "graph", None)
        if graph is None or not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in list(graph.nodes):
            if node.op != "call_module" \
                    or not isinstance(graph_module.get_submodule(node.target), torch.nn.BatchNorm2d):
                continue
            source = node.args[0] if node.args else None
            if getattr(source, "op", None) != "call_module" or len(source.users) != 1:
                continue
            conv = graph_module.get_submodule(source.target)
            if not isinstance(conv, torch.nn.Conv2d):
                continue
            fold_pair(conv, graph_module.get_submodule(node.target))
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            graph_module.delete_submodule(node.target)
            folded += 1
        if folded:
            graph_module.recompile()
    return folded


def fold_batchnorms(module: torch.nn.Module) -> int:
    """Fold every batchnorm that follows a convolution into it (in place). Returns how many were folded; raises
    CompressError when a batchnorm is left that follows no convolution (it would still cost time when served)."""
    module.eval()
    folded = _fold_sequentials(module) + _fold_fx(module)
    left = [name for name, m in module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if left:
        raise CompressError(f"{len(left)} batchnorm(s) follow no convolution and cannot be folded: {left[:3]}")
    return folded

