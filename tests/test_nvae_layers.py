"""Building blocks of the NVAE-compatible model (docs/nvae.md 3), each against a hand computation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from miselbo.nvae.layers import (OPS, SE, BatchNorm, BNSwish, Cell, Conv2D, DecCombinerCell,
                                 EncCombinerCell, FactorizedReduce, get_skip_connection, make_op,
                                 stride_of)


def _manual_weight_norm(weight, log_weight_norm):
    """exp(g_o) w_o / (||w_o|| + 1e-5), filter by filter."""
    filters = []
    for o in range(weight.shape[0]):
        norm = torch.linalg.vector_norm(weight[o])
        filters.append(torch.exp(log_weight_norm[o, 0, 0, 0]) * weight[o] / (norm + 1e-5))
    return torch.stack(filters)


def test_weight_normalised_conv_matches_the_formula(test_device):
    torch.manual_seed(0)
    conv = Conv2D(3, 5, 3, stride=1, padding=1, bias=True).to(test_device)
    norms = torch.linalg.vector_norm(conv.weight.detach().reshape(5, -1), dim=1)
    torch.testing.assert_close(conv.log_weight_norm.detach().reshape(5), torch.log(norms + 0.01))
    with torch.no_grad():
        conv.log_weight_norm.normal_()
    x = torch.randn(2, 3, 6, 6, device=test_device)
    expected = F.conv2d(x, _manual_weight_norm(conv.weight.detach(), conv.log_weight_norm.detach()),
                        conv.bias.detach(), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-6)
    assert sorted(conv.state_dict()) == ["bias", "log_weight_norm", "weight"]
    assert not isinstance(conv.weight_normalized, torch.nn.Parameter)
    assert conv.double().weight_normalized.dtype == torch.float64  # the cached weight follows .to()


def test_conv_without_weight_norm_registers_one_parameter_under_two_names():
    conv = Conv2D(4, 6, 1, bias=False, weight_norm=False)
    state = conv.state_dict()
    assert list(state) == ["weight", "weight_normalized"]
    assert state["weight"].data_ptr() == state["weight_normalized"].data_ptr()
    assert len(list(conv.parameters())) == 1 and conv.log_weight_norm is None
    new_weight, newer_weight = torch.randn(6, 4, 1, 1), torch.randn(6, 4, 1, 1)
    conv.load_state_dict({"weight": new_weight, "weight_normalized": newer_weight})
    assert torch.equal(conv.weight.detach(), newer_weight)  # the alias is copied last and wins
    conv.double()
    assert conv.weight_normalized is conv.weight and conv.weight.dtype == torch.float64
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, newer_weight.double()))


def test_frozen_conv_reuses_its_normalised_weight_until_a_parameter_changes():
    torch.manual_seed(0)
    conv = Conv2D(3, 4, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)  # gradients still flow to the input
    conv(x)
    trained = conv.weight_normalized
    conv(x)
    assert conv.weight_normalized is not trained  # a trained layer rebuilds it (and its graph)
    conv.requires_grad_(False)
    conv(x)
    cached = conv.weight_normalized
    conv(x).sum().backward()
    assert conv.weight_normalized is cached and x.grad is not None
    with torch.no_grad():
        conv.log_weight_norm.add_(0.5)  # an in-place change (optimiser, load_state_dict)
    out = conv(x)
    assert conv.weight_normalized is not cached
    expected = _manual_weight_norm(conv.weight.detach(), conv.log_weight_norm.detach())
    torch.testing.assert_close(conv.weight_normalized, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, F.conv2d(x, expected, conv.bias, padding=1), rtol=1e-5, atol=1e-6)
    conv.load_state_dict({key: value * 2 for key, value in conv.state_dict().items()})
    conv(x)
    torch.testing.assert_close(conv.weight_normalized,
                               _manual_weight_norm(conv.weight.detach(), conv.log_weight_norm.detach()))
    conv.to(memory_format=torch.channels_last)  # new tensors: recomputed in the new layout
    conv(x)
    assert conv.weight_normalized.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(x.detach())
    conv(x).sum().backward()  # not the inference-mode weight, which backward could not save


def test_conv_deepcopies_after_a_forward_with_gradients():
    conv = Conv2D(2, 3, 3, padding=1, bias=True)
    conv(torch.randn(1, 2, 4, 4)).sum().backward()
    clone = copy.deepcopy(conv)
    assert torch.equal(clone.weight, conv.weight) and clone.weight is not conv.weight


def test_data_dependent_init_standardises_the_first_output():
    torch.manual_seed(1)
    conv = Conv2D(3, 4, 3, padding=1, bias=True, data_init=True)
    x = torch.randn(8, 3, 10, 10) * 3 + 1
    y = conv(x).detach()
    # y = (v * x - m) / (5 std): per-channel mean 0 and (unbiased) std 1/5
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.full((4,), 0.2), rtol=1e-4, atol=0)
    assert conv.init_done
    params = [p.detach().clone() for p in conv.parameters()]
    conv(torch.randn(8, 3, 10, 10))
    assert all(torch.equal(a, b) for a, b in zip(params, conv.parameters()))


def test_loading_weights_marks_data_init_done_so_they_survive_the_first_forward():
    source = Conv2D(3, 4, 3, padding=1, bias=True, data_init=True)
    target = Conv2D(3, 4, 3, padding=1, bias=True, data_init=True)
    target.load_state_dict(source.state_dict())
    assert target.init_done
    target(torch.randn(2, 3, 5, 5))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ValueError, match="data_init needs weight_norm"):
        Conv2D(3, 4, 3, data_init=True, weight_norm=False)


def _manual_batch_norm_train(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_batch_norm_variants_keys_statistics_and_swish():
    wrapped, swish = BatchNorm(3), BNSwish(3)
    assert [k for k in wrapped.state_dict()] == [f"bn.{n}" for n in
                                                 ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked")]
    assert list(swish.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                        "num_batches_tracked"]
    for bn in (wrapped.bn, swish):
        assert bn.eps == 1e-5 and bn.momentum == 0.05 and bn.affine
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 5) * 2 + 0.5
    with torch.no_grad():
        swish.weight.uniform_(0.5, 1.5)
        swish.bias.uniform_(-0.5, 0.5)
    normalised = _manual_batch_norm_train(x, swish.weight.detach(), swish.bias.detach())
    torch.testing.assert_close(swish(x), normalised * torch.sigmoid(normalised), rtol=1e-5, atol=1e-6)
    expected_mean = 0.05 * x.mean(dim=(0, 2, 3))
    expected_var = 0.95 + 0.05 * x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(swish.running_mean, expected_mean)
    torch.testing.assert_close(swish.running_var, expected_var)
    assert swish.num_batches_tracked.item() == 1


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2, -1])
def test_every_op_maps_shapes_as_its_stride_says(name, stride):
    C_in = 8
    C_out = {1: 8, 2: 16, -1: 4}[stride]
    op = make_op(name, C_in, C_out, stride)
    x = torch.randn(2, C_in, 8, 8)
    side = {1: 8, 2: 4, -1: 16}[stride]
    out = op(x)
    assert out.shape == (2, C_out, side, side)
    assert torch.isfinite(out).all()


def test_op_key_names_follow_the_reference_patterns():
    up = make_op("mconv_e3k5g0", 8, 4, -1)
    keys = list(up.state_dict())
    assert keys[0] == "conv.1.bn.weight"  # item 0 is the parameter-free up-sampling
    assert "conv.2.conv.0.weight_normalized" in keys and "conv.3.conv.1.running_var" in keys
    assert up.state_dict()["conv.3.conv.0.weight"].shape == (24, 1, 5, 5)  # depthwise, h = 24
    assert up.state_dict()["conv.4.weight"].shape == (4, 24, 1, 1)
    assert "conv.5.bn.num_batches_tracked" in keys
    grouped = make_op("mconv_e3k5g8", 8, 8, 1)
    assert grouped.state_dict()["conv.2.conv.0.weight"].shape == (24, 3, 5, 5)  # 8 groups
    assert list(make_op("res_bnelu", 4, 4, 1).state_dict())[:2] == ["bn.bn.weight", "bn.bn.bias"]
    dilated = make_op("res_bnswish5", 4, 4, 1)
    assert dilated.conv_0.dilation == (2, 2) and dilated.conv_0.padding == (2, 2)
    with pytest.raises(ValueError, match="unknown NVAE operation 'mconv_e6k9g0'"):
        make_op("mconv_e6k9g0", 4, 4, 1)


def test_factorized_reduce_is_four_shifted_pointwise_convs():
    torch.manual_seed(3)
    reduce = FactorizedReduce(4, 10)
    assert [reduce.conv_1.out_channels, reduce.conv_4.out_channels] == [2, 4]
    x = torch.randn(2, 4, 6, 6)
    activated = x * torch.sigmoid(x)
    shifted = [activated[:, :, 0::2, 0::2], activated[:, :, 1::2, 1::2], activated[:, :, 0::2, 1::2],
               activated[:, :, 1::2, 0::2]]
    parts = []
    for conv, part in zip((reduce.conv_1, reduce.conv_2, reduce.conv_3, reduce.conv_4), shifted):
        weight = conv.normalize_weight().detach()[:, :, 0, 0]  # [C_out, C_in]
        parts.append(torch.einsum("oc,bchw->bohw", weight, part) + conv.bias.detach().view(1, -1, 1, 1))
    torch.testing.assert_close(reduce(x), torch.cat(parts, dim=1), rtol=1e-5, atol=1e-6)


def test_up_sampling_skip_is_bilinear_with_aligned_corners():
    skip = get_skip_connection(4, -1)
    upsample, conv = skip[0], skip[1]
    ramp = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 4, 3, 3)  # value = column index
    up = upsample(ramp)
    expected = torch.linspace(0, 2, 6).view(1, 1, 1, 6).expand(1, 4, 6, 6)  # corners aligned
    torch.testing.assert_close(up, expected)
    assert conv.bias is None and conv.out_channels == 2 and list(skip.state_dict()) == [
        "1.weight", "1.log_weight_norm"]
    assert isinstance(get_skip_connection(4, 1), torch.nn.Identity)
    with pytest.raises(ValueError, match="stride must be 1, 2 or -1"):
        get_skip_connection(4, 3)


def test_squeeze_excitation_matches_the_formula():
    torch.manual_seed(4)
    se = SE(32, 32)
    first, second = se.se[0], se.se[2]
    assert first.out_features == 4 and second.in_features == 4  # max(32 // 16, 4)
    x = torch.randn(2, 32, 3, 3)
    pooled = x.mean(dim=(2, 3))
    gate = torch.sigmoid(second(torch.relu(first(pooled))))
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])
    assert SE(128, 128).se[0].out_features == 8


def test_cell_is_skip_plus_a_tenth_of_its_ops():
    torch.manual_seed(5)
    cell = Cell(4, 8, "down_enc", ["res_bnswish", "res_bnswish"], use_se=True).eval()
    assert list(dict(cell.named_children())) == ["skip", "_ops", "se"]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = cell.skip(x) + 0.1 * cell.se(cell._ops[1](cell._ops[0](x)))
        torch.testing.assert_close(cell(x), expected)
    assert cell(x).shape == (2, 8, 4, 4)
    assert [stride_of(t) for t in ("normal_pre", "combiner_dec", "down_enc", "up_post")] == [1, 1, 2, -1]
    with pytest.raises(ValueError, match="unknown cell type 'ar_nn'"):
        stride_of("ar_nn")


def test_combiner_cells():
    torch.manual_seed(6)
    enc, dec = EncCombinerCell(8, 6, 8, "combiner_enc"), DecCombinerCell(6, 4, 6, "combiner_dec")
    feature, state, z = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 4, 4), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(enc(feature, state), feature + enc.conv(state))
    weight = dec.conv.normalize_weight().detach()[:, :, 0, 0]  # [6, 10]: state channels first, then z
    expected = (torch.einsum("oc,bchw->bohw", weight[:, :6], state)
                + torch.einsum("oc,bchw->bohw", weight[:, 6:], z) + dec.conv.bias.detach().view(1, -1, 1, 1))
    torch.testing.assert_close(dec(state, z), expected, rtol=1e-5, atol=1e-5)
    assert enc.conv.weight.shape == (8, 6, 1, 1) and dec.conv.weight.shape == (6, 10, 1, 1)
    assert enc.conv.bias.shape == (8,) and dec.conv.bias.shape == (6,)
