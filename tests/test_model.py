"""BMFN model: parameter counts from bmfn-reference.md section 4, the inference rule of section 6, the losses of
section 5, ESA as learned modules (section 13a), eval-mode determinism, batch independence and batch size 1, and
grouped blocks that compute what separate modules (nn.MultiheadAttention, LayerNorm, BatchNorm2d) compute."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import REPO, per_branch_state_dict

from bmfn_pipeline.ave import BACKGROUND, NUM_CLASSES, SEGMENTS
from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.model import (
    BMFN,
    Attention,
    AudioVisualFusionAttention,
    BMFNConfig,
    BMFNOutput,
    FeedForward,
    GroupedLinear,
    ResidualAttention,
    _pointwise_conv,
    count_parameters,
    fully_supervised_loss,
    group_state_dict,
    predict_segments,
    weakly_supervised_loss,
)
from extractors.weights import uninitialised

# The last commit whose model.py held one module per parallel block: the grouped model must compute what it did.
PER_BRANCH_COMMIT = "f30bbabc106df6aef2a446f05ba7989e00322ef3"
# The last commit whose grouped weights were contiguous [G,out,in] tensors (model.grouped_weight came after it).
CONTIGUOUS_COMMIT = "1fd3c06b606e482ea7adb9e59e21bfd09283d883"
# bmfn-reference.md section 4: live counts 26,768,671 / 26,768,928 plus 6 ESA modules of 88 parameters each.
EXPECTED_PARAMETERS = {"fully": 26_768_671 + 6 * 88, "weakly": 26_768_928 + 6 * 88}


@pytest.fixture(scope="module", params=["fully", "weakly"])
def model(request) -> BMFN:
    torch.manual_seed(0)
    return BMFN(BMFNConfig(mode=request.param))


def _inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    visual = torch.rand(batch, SEGMENTS, 7, 7, 512, generator=generator)
    audio = torch.rand(batch, SEGMENTS, 128, generator=generator)
    return visual, audio


def test_parameter_count_matches_reference(model: BMFN) -> None:
    n = count_parameters(model)
    expected = EXPECTED_PARAMETERS[model.config.mode]
    assert n == expected, f"{model.config.mode}: {n:,} trainable parameters, expected {expected:,}"


def test_stacked_encoder_layers_start_as_copies_of_one_layer_per_kind(model: BMFN) -> None:
    """As the official Encoder's deep copies (_get_clones): within the temporal encoders the two ESA layers start with
    equal weights, and so do the two NSA layers; the kinds differ, and training may move the copies apart."""
    layers = model.self_attention.layers
    esa, nsa = model.config.esa_layers, model.config.nsa_layers
    first = {kind: dict(layers[start].named_parameters()) for kind, start in (("esa", 0), ("nsa", esa))}
    for index, layer in enumerate(layers):
        kind = "esa" if index < esa else "nsa"
        for name, parameter in layer.named_parameters():
            assert torch.equal(parameter, first[kind][name]), f"layer {index} {name} differs from its template"
    parameters = [p for layer in layers for p in layer.parameters()]
    assert len({p.data_ptr() for p in parameters}) == len(parameters)  # copies, not shared weights
    assert not torch.equal(first["esa"]["ffn.linear1.weight"], first["nsa"]["ffn.linear1.weight"])
    assert len(layers) == esa + nsa


def test_output_shapes_and_weak_scores(model: BMFN) -> None:
    model.eval()
    memory_lengths = []
    memory_shapes = []
    hooks = [block.register_forward_pre_hook(lambda _, args: memory_shapes.append(tuple(args[1].shape)))
             for block in (model.cross_modal.cross_attn, model.fusion.fusion_attn)]
    with torch.no_grad():
        out = model(*_inputs(2))
    for hook in hooks:
        hook.remove()
    # memory = concat in time of two 10-token sequences (§2.5, §2.6), for 4 cross-modal blocks and 2 fusions
    assert memory_shapes == [(4, 2, 2 * SEGMENTS, 256), (2, 2, 2 * SEGMENTS, 256)]
    assert out.event_logits.shape == (2, SEGMENTS)
    if model.config.mode == "fully":
        assert out.class_logits.shape == (2, BACKGROUND)
        assert out.event_scores is None
    else:
        assert out.class_logits.shape == (2, NUM_CLASSES)
        # §2.7: softmax over classes of max over time of sigmoid(e) * r.
        joint = torch.sigmoid(out.event_logits)[:, :, None] * out.class_logits[:, None, :]
        torch.testing.assert_close(out.event_scores, torch.softmax(joint.max(dim=1).values, dim=-1))


def test_eval_is_deterministic_batch_independent_and_accepts_batch_one(model: BMFN) -> None:
    model.eval()
    visual, audio = _inputs(4)
    with torch.no_grad():
        first = model(visual, audio)
        second = model(visual, audio)
        alone = model(visual[2:3], audio[2:3])
    for a, b, single in zip(first, second, alone):
        if a is None:
            continue
        assert torch.equal(a, b)
        assert single.shape[0] == 1 and single.shape[1:] == a.shape[1:]
        torch.testing.assert_close(single[0], a[2], atol=1e-5, rtol=1e-5)
    assert predict_segments(alone).shape == (1, SEGMENTS)


def test_gradients_reach_every_parameter(model: BMFN) -> None:
    model.train()
    model.zero_grad()
    visual, audio = _inputs(2)
    out = model(visual, audio)
    if model.config.mode == "fully":
        labels = torch.zeros(2, SEGMENTS, NUM_CLASSES)
        labels[0, :, 3] = 1
        labels[1, :5, 7] = 1
        labels[1, 5:, BACKGROUND] = 1
        loss = fully_supervised_loss(out, labels)
    else:
        labels = torch.zeros(2, NUM_CLASSES)
        labels[0, 3] = 1
        labels[1, BACKGROUND] = 1
        loss = weakly_supervised_loss(out, labels)
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    model.zero_grad()


def test_esa_is_registered_learned_and_uses_running_stats_in_eval(model: BMFN) -> None:
    esa = [m for m in model.modules() if isinstance(m, Attention) and m.expansion]
    assert len(esa) == 2 and all(m.groups == 3 for m in esa)  # 2 ESA layers in each of the 3 self-attention blocks
    names = {name for name, _ in model.named_parameters()}
    for layer in (0, 1):
        assert f"self_attention.layers.{layer}.self_attn.attn.w7.weight" in names
    for module in esa:
        parts = (module.w7, module.bn7, module.w8, module.bn8)
        refinement = sum(p.numel() for part in parts for p in part.parameters())
        assert refinement == 3 * 88  # §2.4, per block
        assert module.w7.weight.shape == (3 * 8, 4, 1, 1) and module.w8.weight.shape == (3 * 4, 8, 1, 1)
        assert module.in_proj_weight.shape == (3, 768, 256) and module.in_proj_bias.shape == (3, 768)
    bn = esa[0].bn7
    bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(*_inputs(2))
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(*_inputs(2))
    assert bn.num_batches_tracked.item() == 1  # eval does not update, it uses the running statistics


@pytest.mark.parametrize("activation", ["sigmoid", "relu6"])
def test_esa_attention_follows_equation_4_in_each_group(activation: str) -> None:
    torch.manual_seed(0)
    esa = Attention(2, 16, 4, dropout=0.1, expansion=2, activation=activation)
    for bn in (esa.bn7, esa.bn8):
        torch.nn.init.normal_(bn.weight)
        torch.nn.init.normal_(bn.bias)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    esa.eval()
    x = torch.randn(2, 2, 5, 16)
    with torch.no_grad():
        out = esa(x, x)

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(2, 5, 4, 4).transpose(1, 2)

    def batch_norm(y: torch.Tensor, bn: torch.nn.BatchNorm2d, channels: slice) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return ((y - bn.running_mean[channels].view(shape)) / torch.sqrt(bn.running_var[channels].view(shape) + bn.eps)
                * bn.weight[channels].view(shape) + bn.bias[channels].view(shape))

    for g in range(2):
        with torch.no_grad():
            w_q, w_k, w_v = esa.in_proj_weight[g].chunk(3)
            b_q, b_k, b_v = esa.in_proj_bias[g].chunk(3)
            q, k, v = (heads(x[g] @ w.T + b) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
            expanded, reduced = slice(8 * g, 8 * g + 8), slice(4 * g, 4 * g + 4)
            w7, w8 = esa.w7.weight[expanded, :, 0, 0], esa.w8.weight[reduced, :, 0, 0]
            expanded_att = batch_norm(torch.einsum("oh,bhts->bots", w7, att), esa.bn7, expanded)
            expanded_att = torch.sigmoid(expanded_att) if activation == "sigmoid" else expanded_att.clamp(0, 6)
            att_hat = batch_norm(torch.einsum("ho,bots->bhts", w8, expanded_att), esa.bn8, reduced)
            mixed = ((att + att_hat) @ v).transpose(1, 2).reshape(2, 5, 16)
            expected = mixed @ esa.out_proj.weight[g].T + esa.out_proj.bias[g]
        torch.testing.assert_close(out[g], expected, atol=1e-5, rtol=1e-5)


def test_grouped_attention_is_nn_multihead_attention_per_group() -> None:
    """NSA, FA/BA and FBFM attentions: each group computes what nn.MultiheadAttention (the official module) does
    with that group's parameters, for self- and cross-attention, with its gradients."""
    torch.manual_seed(0)
    grouped = Attention(3, 16, 4, dropout=0.0).double()
    query = torch.randn(3, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(3, 2, 7, 16, dtype=torch.float64)
    for keys in (query, memory):
        out = grouped(query, keys)
        out.square().sum().backward()
        for g in range(3):
            reference = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
            with torch.no_grad():
                reference.in_proj_weight.copy_(grouped.in_proj_weight[g])
                reference.in_proj_bias.copy_(grouped.in_proj_bias[g])
                reference.out_proj.weight.copy_(grouped.out_proj.weight[g])
                reference.out_proj.bias.copy_(grouped.out_proj.bias[g])
            expected = reference(query[g], keys[g], keys[g], need_weights=False)[0]
            torch.testing.assert_close(out[g], expected)
            expected.square().sum().backward()
            torch.testing.assert_close(grouped.in_proj_weight.grad[g], reference.in_proj_weight.grad)
            torch.testing.assert_close(grouped.out_proj.weight.grad[g], reference.out_proj.weight.grad)
        grouped.zero_grad()


def test_grouped_weights_initialise_as_nn_linear_and_take_gradients_without_a_copy() -> None:
    """A grouped weight is [G,out,in] as nn.Linear's per group, drawn as nn.Linear draws it, but held in memory as
    [G,in,out] (model.grouped_weight): backward writes its gradient in that layout, so autograd copies nothing."""
    torch.manual_seed(0)
    grouped = GroupedLinear(3, 16, 8)
    torch.manual_seed(0)
    reference = torch.nn.Linear(16, 8)
    assert grouped.weight.shape == (3, 8, 16)
    torch.testing.assert_close(grouped.weight[0], reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(grouped.bias[0], reference.bias, rtol=0, atol=0)
    x = torch.randn(3, 5, 16)
    out = grouped(x)
    torch.testing.assert_close(out[1], x[1] @ grouped.weight[1].T + grouped.bias[1])
    with _RecordOps() as record:
        out.square().sum().backward()
    assert "copy_" not in record.ops and "clone" not in record.ops, record.ops
    model = BMFN()
    model(*_inputs(2))[0].sum().backward()
    weights = [p for name, p in model.named_parameters() if p.ndim == 3]
    assert len(weights) == 4 * 4 + 4 + 2  # self-attention layers, cross-modal block, fusion: 22 grouped weights
    assert all(p.grad.stride() == p.stride() for p in weights)
    loaded = uninitialised(BMFN)  # what load_checkpoint fills: the same layout
    assert [p.stride() for p in loaded.parameters()] == [p.stride() for p in model.parameters()]


def test_pointwise_conv_is_a_grouped_1x1_convolution() -> None:
    """The ESA refinement's expansion (4 -> 8 channels per group) and reduction (8 -> 4), and one group."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    for groups, shape in ((3, (24, 4, 1, 1)), (3, (6, 4, 1, 1)), (1, (5, 12, 1, 1))):
        weight = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(_pointwise_conv(x, weight, groups), F.conv2d(x, weight, groups=groups))


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_grouped_batch_norm_keeps_each_groups_training_statistics() -> None:
    """Training mode: the ESA refinement of group g normalises with, and updates, the statistics of its own
    channels only, as a separate BatchNorm2d per group would."""
    torch.manual_seed(0)
    grouped = Attention(2, 16, 4, dropout=0.0, expansion=2).train()
    x = torch.randn(2, 3, 5, 16)
    x[1] = 10 * x[1] + 4  # a second group on another scale
    with torch.no_grad():
        out = grouped(x, x)
    for g in range(2):
        single = Attention(1, 16, 4, dropout=0.0, expansion=2).train()
        expanded, reduced = slice(8 * g, 8 * g + 8), slice(4 * g, 4 * g + 4)
        with torch.no_grad():
            single.in_proj_weight.copy_(grouped.in_proj_weight[g:g + 1])
            single.in_proj_bias.copy_(grouped.in_proj_bias[g:g + 1])
            single.out_proj.weight.copy_(grouped.out_proj.weight[g:g + 1])
            single.out_proj.bias.copy_(grouped.out_proj.bias[g:g + 1])
            single.w7.weight.copy_(grouped.w7.weight[expanded])
            single.w8.weight.copy_(grouped.w8.weight[reduced])
            expected = single(x[g:g + 1], x[g:g + 1])
        torch.testing.assert_close(out[g], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grouped.bn7.running_mean[expanded], single.bn7.running_mean)
        torch.testing.assert_close(grouped.bn8.running_var[reduced], single.bn8.running_var)


def _model_at(commit: str, name: str) -> types.ModuleType:
    """bmfn_pipeline/model.py as of `commit`, read from the repository's history, as module `name`."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:bmfn_pipeline/model.py"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"{name} needs the repository's git history (commit {commit[:7]})")
    module = sys.modules[name] = types.ModuleType(name)  # dataclasses look it up
    exec(compile(source, f"{name}.py", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def per_branch_models() -> types.ModuleType:
    return _model_at(PER_BRANCH_COMMIT, "per_branch_model")


def test_parameters_keep_the_order_and_values_of_the_contiguous_model() -> None:
    """The model before its grouped weights were held transposed (CONTIGUOUS_COMMIT) has the same parameters in the
    same order (a last.pt's optimizer state is matched to them by position), draws the same initial values from
    the same seed, and computes the same outputs."""
    before = _model_at(CONTIGUOUS_COMMIT, "contiguous_model")
    torch.manual_seed(0)
    old = before.BMFN(before.BMFNConfig()).eval()
    torch.manual_seed(0)
    new = BMFN().eval()
    assert [name for name, _ in old.named_parameters()] == [name for name, _ in new.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))
    with torch.no_grad():
        for a, b in zip(old(*_inputs(2)), new(*_inputs(2))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fully", "weakly"])
def test_grouped_model_computes_what_the_per_block_model_computed(per_branch_models, mode: str) -> None:
    """In float64, with the per-block model's weights (and batch-norm statistics) converted by group_state_dict:
    the same outputs in eval mode, and in training mode (dropout off) the same outputs and gradients."""
    torch.manual_seed(0)
    config = dict(mode=mode, dropout=0.0, visual_dropout=0.0)
    old = per_branch_models.BMFN(per_branch_models.BMFNConfig(**config)).double()
    for module in old.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(module.weight)
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    new = BMFN(BMFNConfig(**config)).double()
    new.load_state_dict(group_state_dict(old.state_dict()))
    visual, audio = (x.double() for x in _inputs(3))
    for training in (False, True):
        old.train(training), new.train(training)
        expected, out = old(visual, audio), new(visual, audio)
        for a, b in zip(expected, out):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    (expected.event_logits.sum() + expected.class_logits.square().sum()).backward()
    (out.event_logits.sum() + out.class_logits.square().sum()).backward()
    expected_grads = group_state_dict({name: p.grad for name, p in old.named_parameters()})
    for name, parameter in new.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-8, atol=1e-10)
    new_stats = new.state_dict()
    for name, value in group_state_dict(old.state_dict()).items():  # running statistics after the training pass
        torch.testing.assert_close(new_stats[name], value, rtol=1e-10, atol=1e-12)


def test_per_branch_state_dict_of_earlier_versions_loads_grouped() -> None:
    """A state_dict with one module per block (bmfn before grouping: av/visual/audio_self_attention, fa1..ba2,
    fbfm1/2) loads into the grouped model as it is (BMFN.load_state_dict converts it), each block's tensors in its
    group."""
    torch.manual_seed(0)
    model = BMFN()
    state = model.state_dict()
    per_branch = per_branch_state_dict(state)
    assert "fbfm2.fusion_attn.attn.in_proj_weight" in per_branch
    assert per_branch["av_self_attention.layers.0.self_attn.attn.w7.weight"].shape == (8, 4, 1, 1)
    regrouped = BMFN()
    regrouped.load_state_dict(per_branch)
    assert all(torch.equal(value, regrouped.state_dict()[key]) for key, value in state.items())
    assert group_state_dict(state) is state


def test_relu6_option_builds_a_different_model() -> None:
    torch.manual_seed(0)
    model = BMFN(BMFNConfig(esa_activation="relu6"))
    activations = {type(m.activation) for m in model.modules() if isinstance(m, Attention) and m.expansion}
    assert activations == {torch.nn.ReLU6}
    assert count_parameters(model) == EXPECTED_PARAMETERS["fully"]
    assert BMFNConfig().esa_activation == "sigmoid"  # the paper's default (§13a)


def _output(event_logits: list[list[float]], class_logits: list[list[float]], weak: bool = False) -> BMFNOutput:
    classes = torch.tensor(class_logits)
    return BMFNOutput(torch.tensor(event_logits), classes, torch.softmax(classes, dim=-1) if weak else None)


def test_predict_segments_thresholds_event_logits() -> None:
    logits = [[3.0, -2.0, 0.0, 0.01, -0.01, 5.0, 5.0, -9.0, 1.0, 1.0],
              [-1.0] * 10]
    classes = torch.zeros(2, BACKGROUND)
    classes[0, 5] = 2.0
    classes[1, 11] = 1.0
    pred = predict_segments(_output(logits, classes.tolist()))
    assert pred.dtype == torch.long
    # sigmoid(0) = 0.5 is not > 0.5, so a zero logit is background.
    assert pred[0].tolist() == [5, 28, 28, 5, 28, 5, 5, 28, 5, 5]
    assert pred[1].tolist() == [BACKGROUND] * 10
    # bfloat16 logits (autocast): sigmoid in bf16 is exactly 0.5 up to 0.0078, which scored these as background
    small = _output([[0.005, 0.0078, -0.005] + [1.0] * 7], classes[:1].tolist())
    assert predict_segments(small._replace(event_logits=small.event_logits.bfloat16()))[0, :3].tolist() == [5, 5, 28]


def test_predict_segments_weak_uses_29_way_class() -> None:
    classes = torch.zeros(2, NUM_CLASSES)
    classes[0, BACKGROUND] = 4.0  # the raw r favours background: positive segments are still background
    classes[1, 2] = 4.0
    logits = [[2.0] * 5 + [-2.0] * 5, [2.0] * 5 + [-2.0] * 5]
    pred = predict_segments(_output(logits, classes.tolist(), weak=True))
    assert pred[0].tolist() == [BACKGROUND] * 10
    assert pred[1].tolist() == [2] * 5 + [BACKGROUND] * 5


def _bce(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_fully_supervised_loss_matches_manual_computation() -> None:
    labels = torch.zeros(2, SEGMENTS, NUM_CLASSES)
    labels[:, :, BACKGROUND] = 1
    labels[0, 2:6, 3], labels[0, 2:6, BACKGROUND] = 1, 0  # class 3 in seconds 2-5
    labels[1, 0:3, 2], labels[1, 0:3, BACKGROUND] = 1, 0  # two classes: the larger index (9) is the video class
    labels[1, 7:9, 9], labels[1, 7:9, BACKGROUND] = 1, 0
    generator = torch.Generator().manual_seed(3)
    event_logits = torch.randn(2, SEGMENTS, generator=generator)
    class_logits = torch.randn(2, BACKGROUND, generator=generator)
    loss = fully_supervised_loss(BMFNOutput(event_logits, class_logits, None), labels)

    flags = labels[..., :BACKGROUND].sum(-1)
    bce = sum(_bce(event_logits[b, t].item(), flags[b, t].item()) for b in range(2) for t in range(SEGMENTS)) / 20
    log_z = [math.log(sum(math.exp(c) for c in row)) for row in class_logits.tolist()]
    ce = ((log_z[0] - class_logits[0, 3].item()) + (log_z[1] - class_logits[1, 9].item())) / 2
    assert loss.item() == pytest.approx(bce + ce, rel=1e-5)


def test_weakly_supervised_loss_matches_manual_computation() -> None:
    scores = torch.softmax(torch.randn(2, NUM_CLASSES, generator=torch.Generator().manual_seed(4)), dim=-1)
    labels = torch.zeros(2, NUM_CLASSES)
    labels[0, 6] = 1
    labels[1, BACKGROUND] = 1  # a background-only clip (labels_noisy.h5)
    output = BMFNOutput(torch.zeros(2, SEGMENTS), torch.zeros(2, NUM_CLASSES), scores)
    pairs = [(scores[b, c].item(), labels[b, c].item()) for b in range(2) for c in range(NUM_CLASSES)]
    # Official: MultiLabelSoftMarginLoss applies a sigmoid to the softmax probabilities.
    official = sum(_bce(p, y) for p, y in pairs) / len(pairs)
    plain = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for p, y in pairs) / len(pairs)
    assert weakly_supervised_loss(output, labels).item() == pytest.approx(official, rel=1e-5)
    plain_loss = weakly_supervised_loss(output, labels, sigmoid_on_probabilities=False)
    assert plain_loss.item() == pytest.approx(plain, rel=1e-5)


def test_losses_refuse_the_other_mode() -> None:
    labels = torch.zeros(1, SEGMENTS, NUM_CLASSES)
    with pytest.raises(BmfnError, match="fully"):
        weakly_supervised_loss(BMFNOutput(torch.zeros(1, SEGMENTS), torch.zeros(1, BACKGROUND), None), labels[:, 0])
    weak = BMFNOutput(torch.zeros(1, SEGMENTS), torch.zeros(1, NUM_CLASSES), torch.full((1, NUM_CLASSES), 1 / 29))
    with pytest.raises(BmfnError, match="weakly"):
        fully_supervised_loss(weak, labels)


def test_mfb_gradient_is_finite_at_zero() -> None:
    fusion = AudioVisualFusionAttention(BMFNConfig()).eval()
    visual = torch.zeros(3, 49, 2560, requires_grad=True)
    audio = torch.randn(3, 2560)
    out = fusion.mfb(visual, audio)  # the signed square root has an infinite slope at 0
    assert torch.equal(out, torch.zeros(3, 49, 512))
    out.sum().backward()
    assert torch.isfinite(visual.grad).all()


@pytest.mark.parametrize("given, message", [
    ({"mfb_dim": 2048}, "mfb_dim 2048 must equal mfb_k * mfb_o = 2560"),  # eq. 2's sum pooling needs k * o channels
    ({"heads": True}, "heads=True, expected a whole number of at least 1"),  # a bool is no size, though an int
    ({"d_model": 32.5}, "d_model=32.5, expected a whole number of at least 1"),
    ({"esa_layers": -1}, "esa_layers=-1, expected a whole number of at least 0"),
    ({"dropout": -0.1}, "dropout=-0.1, expected a rate from 0 to below 1"),
    ({"dropout": 1.0}, "dropout=1.0, expected a rate from 0 to below 1"),  # F.dropout would zero every value
    ({"visual_dropout": False}, "visual_dropout=False, expected a rate from 0 to below 1"),
])
def test_config_values_outside_their_range_are_refused(given: dict, message: str) -> None:
    with pytest.raises(BmfnError, match=f"^BMFN config: {re.escape(message)}$"):
        BMFNConfig(**given)


def test_config_keeps_whole_float_sizes_as_int_and_rates_as_float() -> None:
    """A JSON config or a numpy value may give 256.0 or np.int64(4): kept as plain ints (checkpoints hold plain
    numbers, and layer sizes must be ints); a rate of 0 as a float."""
    config = BMFNConfig(d_model=256.0, heads=np.int64(4), esa_layers=0, dropout=0)
    kept = (config.d_model, config.heads, config.esa_layers, config.dropout)
    assert kept == (256, 4, 0, 0.0) and [type(v) for v in kept] == [int, int, int, float]


def test_check_inputs_refuses_shapes_the_network_does_not_take() -> None:
    """One line naming the shapes, not a reshape error deep inside the network; the cells may lie in any grid."""
    config = BMFNConfig()
    config.check_inputs("features", (1, SEGMENTS, 49, 1, 512), (1, SEGMENTS, 128))  # 49 cells in another grid
    for visual, audio in [
        ((1, SEGMENTS, 7, 6, 512), (1, SEGMENTS, 128)),  # 42 cells, not the config's 49
        ((1, SEGMENTS, 7, 7, 512), (1, SEGMENTS - 1, 128)),  # audio of other time steps than the visual maps
        ((2, SEGMENTS, 7, 7, 512), (1, SEGMENTS, 128)),  # another batch
        ((1, SEGMENTS, 7, 7, 256), (1, SEGMENTS, 128)),
    ]:
        with pytest.raises(BmfnError, match=re.escape(f"features: expected visual [B,T,7,7,512] and audio "
                                                      f"[B,T,128], got {list(visual)} and {list(audio)}")):
            config.check_inputs("features", visual, audio)


def test_bad_config_and_inputs_raise_bmfn_error(model: BMFN) -> None:
    with pytest.raises(BmfnError, match="mode"):
        BMFNConfig(mode="semi")
    with pytest.raises(BmfnError, match="esa_activation"):
        BMFNConfig(esa_activation="gelu")
    visual, audio = _inputs(1)
    with pytest.raises(BmfnError, match="audio"):
        model(visual, audio[:, :, :64])


def test_mfb_drops_products_then_sum_pools_signed_roots_and_l2_normalises() -> None:
    """Eq. (2) by hand on tiny tensors: z_j = sum_r dropout(v * a)[k*j + r], sign(z) sqrt|z|, unit length over the
    output channels of each cell. In training the dropout acts on the k*o products, before the sum pooling."""
    fusion = AudioVisualFusionAttention(BMFNConfig(mfb_k=2, mfb_o=3, mfb_dim=6, dropout=0.5))
    generator = torch.Generator().manual_seed(0)
    visual, audio = torch.randn(2, 4, 6, generator=generator), torch.randn(2, 6, generator=generator)

    def by_hand(mask: torch.Tensor) -> torch.Tensor:
        expected = torch.zeros(2, 4, 3)
        for n in range(2):
            for cell in range(4):
                roots = []
                for j in range(3):
                    z = sum(visual[n, cell, 2 * j + r] * audio[n, 2 * j + r] * mask[n, cell, 2 * j + r] for r in (0, 1))
                    roots.append(math.copysign(math.sqrt(abs(z)), z))
                length = math.sqrt(sum(root * root for root in roots))
                expected[n, cell] = torch.tensor([root / length for root in roots])
        return expected

    torch.testing.assert_close(fusion.eval().mfb(visual, audio), by_hand(torch.ones(2, 4, 6)))
    torch.manual_seed(5)
    mask = F.dropout(torch.ones(2, 4, 6), 0.5, training=True)  # the draws F.dropout makes for the products
    assert (mask == 0).any() and (mask == 2).any()
    torch.manual_seed(5)
    torch.testing.assert_close(fusion.train().mfb(visual, audio), by_hand(mask))


def test_feed_forward_and_residual_attention_drop_where_the_reference_does() -> None:
    """Training mode, by hand: FFN LN(x + Dropout(W2 Dropout(ReLU(W1 x)))), attention LN(q + Dropout(Att(q, m)))
    (post-LN, the dropped sub-layer output added to the residual), each group with its own weights."""
    torch.manual_seed(0)
    ffn = FeedForward(2, 4, 6, dropout=0.5).train()
    x = torch.randn(2, 3, 4)
    torch.manual_seed(7)
    hidden_mask, out_mask = (F.dropout(torch.ones(shape), 0.5, training=True) for shape in ((2, 3, 6), (2, 3, 4)))
    torch.manual_seed(7)
    with torch.no_grad():
        out = ffn(x)
        for g in range(2):
            hidden = torch.relu(x[g] @ ffn.linear1.weight[g].T + ffn.linear1.bias[g]) * hidden_mask[g]
            sub_layer = (hidden @ ffn.linear2.weight[g].T + ffn.linear2.bias[g]) * out_mask[g]
            torch.testing.assert_close(out[g], F.layer_norm(x[g] + sub_layer, (4,)))

    residual = ResidualAttention(Attention(2, 8, 2, dropout=0.0), 8, dropout=0.5).train()
    query, memory = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    with torch.no_grad():
        attended = residual.attn(query, memory)  # no dropout inside: no random draws
        torch.manual_seed(3)
        mask = F.dropout(torch.ones(2, 3, 5, 8), 0.5, training=True)
        torch.manual_seed(3)
        torch.testing.assert_close(residual(query, memory), F.layer_norm(query + attended * mask, (8,)))


def test_esa_drops_the_attention_map_before_its_refinement() -> None:
    """Training mode (batch norms in eval, for fixed statistics), by hand: Att is dropped, then (Att + Att_hat(Att))
    weights V, as the official code drops the map (§2.4)."""
    torch.manual_seed(0)
    esa = Attention(1, 8, 2, dropout=0.5, expansion=2)
    for bn in (esa.bn7, esa.bn8):
        torch.nn.init.normal_(bn.weight)
        torch.nn.init.normal_(bn.bias)
    esa.train()
    esa.bn7.eval(), esa.bn8.eval()  # running statistics: mean 0, variance 1
    x = torch.randn(1, 3, 5, 8)
    torch.manual_seed(11)
    mask = F.dropout(torch.ones(3, 2, 5, 5), 0.5, training=True)
    torch.manual_seed(11)
    with torch.no_grad():
        out = esa(x, x)
        q, k, v = ((x[0] @ w.T + b).reshape(3, 5, 2, 4).transpose(1, 2)
                   for w, b in zip(esa.in_proj_weight[0].chunk(3), esa.in_proj_bias[0].chunk(3)))
        att = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1) * mask

        def bn(y: torch.Tensor, norm: torch.nn.BatchNorm2d) -> torch.Tensor:
            return y / math.sqrt(1 + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

        expanded = torch.sigmoid(bn(torch.einsum("oh,bhts->bots", esa.w7.weight[:, :, 0, 0], att), esa.bn7))
        att_hat = bn(torch.einsum("ho,bots->bhts", esa.w8.weight[:, :, 0, 0], expanded), esa.bn8)
        mixed = ((att + att_hat) @ v).transpose(1, 2).reshape(3, 5, 8)
        torch.testing.assert_close(out[0], mixed @ esa.out_proj.weight[0].T + esa.out_proj.bias[0])


def test_nsa_drops_attention_weights_in_training_only() -> None:
    """The standard attentions (NSA, FA/BA, FBFM) drop attention weights while training, as nn.MultiheadAttention:
    two training passes differ, and neither is the eval pass, which is the same every time."""
    torch.manual_seed(0)
    attention = Attention(1, 8, 2, dropout=0.5)
    query, memory = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    with torch.no_grad():
        evaluated = attention.eval()(query, memory)
        assert torch.equal(evaluated, attention(query, memory))
        first, second = attention.train()(query, memory), attention(query, memory)
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)


def test_visual_dropout_drops_the_adapted_cells_both_attentions_read() -> None:
    """§2 step 1: Dropout(ReLU(v_fc(x))) per cell, the same dropped cells read by the visual attention and by AVFA."""
    torch.manual_seed(0)
    config = BMFNConfig(d_model=16, heads=2, ffn_dim=16, mfb_k=2, mfb_o=8, mfb_dim=16, esa_layers=1, nsa_layers=0,
                        dropout=0.0, visual_dropout=0.5)
    model = BMFN(config).train()
    visual, audio = _inputs(1)
    read = []
    hooks = [block.register_forward_pre_hook(lambda _, args: read.append(args[0]))
             for block in (model.visual_attention, model.fusion_attention)]
    torch.manual_seed(2)
    mask = F.dropout(torch.ones(1, SEGMENTS, 7, 7, 512), 0.5, training=True)
    torch.manual_seed(2)
    with torch.no_grad():
        model(visual, audio)
        expected = (F.relu(model.v_fc(visual)) * mask).reshape(SEGMENTS, 49, 512)
    for hook in hooks:
        hook.remove()
    assert len(read) == 2
    for cells in read:
        torch.testing.assert_close(cells, expected)


def test_default_dropout_rates_are_the_references() -> None:
    """§2: 0.1 in the attentions, FFNs, residuals and MFB; 0.2 after v_fc; as the built model uses them."""
    config = BMFNConfig()
    assert (config.dropout, config.visual_dropout, config.mfb_k, config.mfb_o) == (0.1, 0.2, 5, 512)
    model = BMFN()
    assert model.visual_dropout.p == 0.2 and model.fusion_attention.dropout == 0.1
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m is not model.visual_dropout}
    assert rates == {0.1} and {m.dropout for m in model.modules() if isinstance(m, Attention)} == {0.1}
