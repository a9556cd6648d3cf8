"""builder.compress.prune and builder.compress.fold on the fixture detector's trainable copy.

Pruning at the issue's ratios with both importances keeps the heads' output channels and the copy's interface,
removes the asked fraction of prunable channels and leaves the input copy untouched; ChannelScales and folding
keep the function; bias compensation makes removing a constant channel exact where plain removal is not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.compress import CompressError, set_torch_threads
from builder.compress import prune as pr
from builder.compress import torch_copy as tc
from builder.compress import compensate as cp
from builder.compress.fold import fold_batchnorms, fold_pair
from builder.optimize.evaluate import prepare_image
from builder.spec import load_spec
from tests.conftest import FIXTURES, IMAGES, MODEL, SPEC

set_torch_threads(1)


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> tc.TrainableCopy:
    return tc.to_torch(MODEL, tmp_path_factory.mktemp("prune"), threads=1)


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def unlabelled(spec) -> np.ndarray:
    """Bias-compensation images: three of the unlabelled photos (never the evaluation photos)."""
    paths = sorted((FIXTURES / "images_more").iterdir())[:3]
    return np.stack([prepare_image(spec, p)[0] for p in paths])


@pytest.fixture(scope="module")
def photo(spec) -> np.ndarray:
    return prepare_image(spec, IMAGES / "dog.jpg")[0][None]


def heads_of(copy: tc.TrainableCopy, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    copy.module.eval()
    with torch.no_grad():
        return tuple(t.numpy() for t in copy.module(torch.from_numpy(tc.nhwc_to_input(batch))))


# every ratio x importance is slow (a few seconds each): `make unit` runs the 50% magnitude one
@pytest.mark.parametrize("importance,ratio", [
    pytest.param(i, r, marks=() if (i, r) == ("magnitude", 0.5) else pytest.mark.slow)
    for i in pr.IMPORTANCES for r in pr.RATIOS])
def test_prune_ratio_keeps_heads(copy, unlabelled, photo, importance, ratio):
    before = sum(p.numel() for p in copy.module.parameters())
    result = pr.prune(copy, pr.PruneSettings(ratio, importance), unlabelled)
    record = result.to_dict()
    print(f"\n{result.settings.name}: {record['prunable_channels_removed']:.3f} of prunable channels removed, "
          f"params {record['params_before']:,} -> {record['params_after']:,} "
          f"({record['params_reduction']:.1%}), MACs -{record['macs_reduction']:.1%}")
    assert abs(record["prunable_channels_removed"] - ratio) < 0.05
    assert record["params_after"] < record["params_before"] and record["macs_after"] < record["macs_before"]
    heads = pr.head_convolutions(result.copy)
    assert sorted(c.out_channels for c in heads) == [4, 80]
    logits, wh = heads_of(result.copy, photo)
    assert logits.shape == (1, 80, 128, 128) and wh.shape == (1, 4, 128, 128)
    assert sum(p.numel() for p in copy.module.parameters()) == before  # the input copy is not pruned


def test_params_counted_as_served(copy, unlabelled):
    """bn-scale's ChannelScales are folded before counting: both importances start from the same model, give or
    take the biases folding gives the convolutions that had none (the heads' depthwise ones)."""
    magnitude = pr.prune(copy, pr.PruneSettings(0.3, "magnitude"), unlabelled)
    bn_scale = pr.prune(copy, pr.PruneSettings(0.3, "bn-scale"), unlabelled)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in magnitude.copy.module.modules())
    assert abs(bn_scale.params_before / magnitude.params_before - 1) < 0.005
    assert abs(bn_scale.macs_before / magnitude.macs_before - 1) < 0.01


def test_channel_scales_keep_the_function(copy, photo):
    scaled = pr.clone(copy)
    added = pr.with_bn_scales(scaled)
    assert added == sum(isinstance(m, torch.nn.Conv2d) for m in copy.module.modules()) - 2  # all but the heads
    assert pr.with_bn_scales(scaled) == 0
    report = tc.check_equality(scaled, photo)
    assert report.passed, report.to_dict()
    # train mode computes the same (running statistics, not batch statistics)
    scaled.module.train()
    with torch.no_grad():
        trained = scaled.module(torch.from_numpy(tc.nhwc_to_input(photo)))
    np.testing.assert_allclose(trained[0].numpy(), heads_of(scaled, photo)[0], atol=1e-5)
    assert pr.sparsity_loss(scaled.module).item() > 0
    assert pr.sparsity_loss(copy.module).item() == 0
    # folding them back: no batchnorm left, same function
    fold_batchnorms(scaled.module)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in scaled.module.modules())
    assert tc.check_equality(scaled, photo).passed


def _make_constant_channel(copy: tc.TrainableCopy) -> tuple[torch.nn.Conv2d, int]:
    """A squeeze-excite reduction convolution's channel made constant (weights 0, bias 2): after its ReLU it adds
    a constant to the expanding convolution's input, which removing the channel loses. The channel is the one the
    expanding convolution weighs most (many of this block's channels are read with zero weights)."""
    def conv_named(part: str) -> torch.nn.Conv2d:
        return next(m for n, m in copy.module.named_modules() if isinstance(m, torch.nn.Conv2d) and part in n)

    conv = conv_named("expanded_conv_12/squeeze_excite/Conv/")
    expand = conv_named("expanded_conv_12/squeeze_excite/Conv_1/")
    channel = int(expand.weight.detach().flatten(2).norm(dim=(0, 2)).argmax())
    with torch.no_grad():
        conv.weight[channel].zero_()
        conv.bias[channel] = 2.0
    return conv, channel


@pytest.mark.parametrize("compensate", [True, False])
def test_bias_compensation_of_a_constant_channel(copy, unlabelled, photo, compensate):
    import torch_pruning as tp

    model = pr.clone(copy)
    conv, channel = _make_constant_channel(model)
    expected = heads_of(model, photo)
    graph = tp.DependencyGraph().build_dependency(model.module, torch.zeros(model.input_shape(1)))
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[channel])
    if compensate:
        stats = cp.input_stats(model.module, torch.from_numpy(tc.nhwc_to_input(unlabelled)))
        cp.compensate(group, stats, graph.is_out_channel_pruning_fn, "mean")
    group.prune()
    assert conv.out_channels == 135
    diff = float(np.max(np.abs(heads_of(model, photo)[0] - expected[0])))
    print(f"\nconstant channel removed, compensated={compensate}: heatmap logits max abs diff {diff:.2e}")
    if compensate:
        assert diff < 1e-3
    else:
        assert diff > 1e-2


def test_fold_pair_is_exact():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    model = torch.nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorms(model) == 1
        got = model(x)
    assert isinstance(model[1], torch.nn.Identity)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CompressError, match="6 output channels"):
        fold_pair(torch.nn.Conv2d(3, 6, 1), torch.nn.BatchNorm2d(4))


def test_fold_in_an_fx_graph_and_refusal():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    traced = torch.fx.symbolic_trace(Net().eval())
    with torch.no_grad():
        traced.bn.running_mean.fill_(0.5)
    x = torch.randn(1, 3, 4, 4)
    expected = traced(x)
    assert fold_batchnorms(traced) == 1
    torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=1e-5)
    lone = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(3))
    with pytest.raises(CompressError, match="follow no convolution"):
        fold_batchnorms(lone)


@pytest.mark.parametrize("kwargs,match", [({"ratio": 0.0}, "in \\(0, 1\\)"), ({"ratio": 1.0}, "in \\(0, 1\\)"),
                                          ({"ratio": True}, "in \\(0, 1\\)"),
                                          ({"ratio": 0.5, "importance": "taylor"}, "not one of"),
                                          ({"ratio": 0.5, "round_to": 0}, "round_to"),
                                          ({"ratio": 0.5, "compensate_bias": "yes"}, "compensate_bias")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(CompressError, match=match):
        pr.PruneSettings(**kwargs)


def test_compensation_needs_images(copy):
    with pytest.raises(CompressError, match="needs images"):
        pr.prune(copy, pr.PruneSettings(0.3))
    result = pr.prune(copy, pr.PruneSettings(0.3, compensate_bias=False))
    assert result.settings.name == "pruned30-magnitude"


def _heatmap_correlation(copy: tc.TrainableCopy, result: pr.PruneResult, photo: np.ndarray) -> float:
    return float(np.corrcoef(heads_of(copy, photo)[0].ravel(), heads_of(result.copy, photo)[0].ravel())[0, 1])


@pytest.mark.parametrize("scope,bound", [("group", 0.85), ("global", 0.95)])
def test_activation_importance_keeps_the_heads_at_5_percent(copy, unlabelled, photo, scope, bound):
    """5% pruned without fine-tuning, importance measured on unlabelled photos (never the evaluation photo): the
    heatmap logits stay close to the teacher's. Measured on 3 evaluation photos (2026-11-30): 0.91 per group,
    0.98 global; magnitude importance 0.67. The bounds leave ~0.05 and ~0.03 of margin."""
    result = pr.prune(copy, pr.PruneSettings(0.05, "activation", scope=scope), unlabelled)
    correlation = _heatmap_correlation(copy, result, photo)
    print(f"\n{result.settings.name}: heatmap logits correlation {correlation:.4f}, "
          f"params -{result.to_dict()['params_reduction']:.1%}")
    assert correlation > bound
    assert result.params_after < result.params_before


def test_activation_importance_needs_images(copy):
    with pytest.raises(CompressError, match="needs images"):
        pr.prune(copy, pr.PruneSettings(0.05, "activation", compensate_bias=False))
    with pytest.raises(CompressError, match="scope"):
        pr.PruneSettings(0.05, "activation", scope="layer")


@pytest.mark.slow
def test_every_group_removes_exactly_its_channels(copy, photo):
    """Torch-Pruning's groups are coupled right on this graph (the feature pyramid's Concats included): pruning each
    group, one after the other, gives what zeroing the removed input channels of its convolutions gave just before.
    (The 5% collapse was the importance's choice of channels, not a stale Concat offset.)"""
    import torch_pruning as tp

    model = pr.clone(copy)
    heads = pr.head_convolutions(model)
    pruner = tp.pruner.MetaPruner(model.module, torch.zeros(model.input_shape(1)),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.05,
                                  ignored_layers=heads, global_pruning=False)
    is_out = pruner.DG.is_out_channel_pruning_fn
    groups = concat_groups = 0
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            saved = []
            for dep, idxs in group:
                layer = dep.target.module
                if isinstance(layer, torch.nn.Conv2d) and layer.groups == 1 and not is_out(dep.handler):
                    removed = sorted({int(i) for i in idxs})
                    saved.append((layer, removed, layer.weight[:, removed].clone()))
                    layer.weight[:, removed] = 0
            masked = heads_of(model, photo)
            for layer, removed, weight in saved:
                layer.weight[:, removed] = weight
            concat_groups += any(type(dep.target.module).__name__ == "_ConcatOp" for dep, _ in group)
            group.prune()
            pruned = heads_of(model, photo)
            for got, expected in zip(pruned, masked):
                np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)
            groups += 1
    print(f"\n{groups} groups ({concat_groups} through a Concat) pruned exactly as masked")
    assert groups > 10 and concat_groups >= 2


@pytest.mark.parametrize("method, exact", [("least-squares", True), ("mean", False)])
def test_least_squares_gives_back_a_channel_the_kept_ones_predict(method, exact):
    """A channel that is a linear combination of two others (plus a constant) is removed: least squares folds it
    back into the next convolution's weights and the output is unchanged; the mean alone cannot."""
    import torch_pruning as tp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 3)).eval()  # no padding: the zeros there are not the regression's
    with torch.no_grad():
        first = model[0]
        first.weight[3] = first.weight[0] + 2 * first.weight[1]
        first.bias[3] = first.bias[0] + 2 * first.bias[1] + 0.5
    images = torch.randn(4, 3, 16, 16)
    expected = model(images)
    stats = cp.input_stats(model, images, covariance=method == "least-squares")
    graph = tp.DependencyGraph().build_dependency(model, torch.zeros(1, 3, 16, 16))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[3])
    cp.compensate(group, stats, graph.is_out_channel_pruning_fn, method)
    group.prune()
    assert model[1].in_channels == 3 and tuple(stats[id(model[1])].mean.shape) == (3,)
    error = float((model(images) - expected).abs().max() / expected.abs().max())
    print(f"\n{method}: relative max error {error:.2e}")
    assert (error < 1e-3) if exact else (error > 1e-2)
