"""Autoregressive flow cells: masks, ordering (Jacobian), inversion, state_dict names, golden flows."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from conftest import golden_case_dir
from miselbo.nvae.flows import (
    ARConv2d,
    CellAR,
    PairedCellAR,
    channel_mask,
    conv_mask,
    default_inversion_tol,
    invert_additive_flow,
    invert_flow_chain,
)

NUM_Z = 4


def make_cell(seed=0, mu_boost=1.0, conv_boost=1.0, dtype=torch.float32):
    """A paired cell whose mu is scaled up: every filter norm times conv_boost, mu's times mu_boost."""
    torch.manual_seed(seed)
    paired = PairedCellAR(NUM_Z, 8, 8 * NUM_Z)
    with torch.no_grad():
        for cell in (paired.cell1, paired.cell2):
            cell.mu.conv_0.log_weight_norm.add_(math.log(mu_boost))
            cell.mu.conv_0.bias.normal_(0.0, 1.0)
            for index in (0, 2):
                cell.conv.convz[index].log_weight_norm.add_(math.log(conv_boost))
    return paired.to(dtype)


def random_z(seed, shape=(3, NUM_Z, 4, 4), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- masks

def test_channel_mask_expanding_and_contracting():
    expanding = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 0]], dtype=torch.float32)
    assert torch.equal(channel_mask(2, 1, 4, zero_diag=True), expanding)
    expanding_diag = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]], dtype=torch.float32)
    assert torch.equal(channel_mask(2, 1, 4, zero_diag=False), expanding_diag)
    contracting = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(channel_mask(4, 1, 2, zero_diag=False), contracting)
    contracting_strict = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(channel_mask(4, 1, 2, zero_diag=True), contracting_strict)
    assert torch.equal(channel_mask(6, 6, 6, zero_diag=False), torch.ones(6, 1))
    assert torch.equal(channel_mask(6, 6, 6, zero_diag=True), torch.zeros(6, 1))
    with pytest.raises(ValueError, match="divide"):
        channel_mask(4, 1, 6, zero_diag=False)
    with pytest.raises(ValueError, match="groups"):
        channel_mask(4, 2, 4, zero_diag=False)


def test_conv_mask_raster_pattern_and_mirror():
    mask = conv_mask(3, 1, 1, 1, zero_diag=False, mirror=False)[0, 0]
    assert torch.equal(mask, torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0]]))
    strict = conv_mask(3, 1, 1, 1, zero_diag=True, mirror=False)[0, 0]
    assert torch.equal(strict, torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]]))
    mirrored = conv_mask(3, 1, 1, 1, zero_diag=False, mirror=True)[0, 0]
    assert torch.equal(mirrored, torch.tensor([[0.0, 0, 0], [0, 1, 1], [1, 1, 1]]))
    centre = conv_mask(5, 2, 1, 4, zero_diag=True, mirror=True)[:, :, 2, 2]
    assert torch.equal(centre, channel_mask(2, 1, 4, zero_diag=True))
    with pytest.raises(ValueError, match="odd"):
        conv_mask(4, 1, 1, 1, zero_diag=False, mirror=False)


# ---------------------------------------------------------------- autoregressive structure

def order_keys(height, width, mirror):
    """Position of element (c, y, x) in the flow's ordering: pixel order first, then channel."""
    channel = torch.arange(NUM_Z).view(NUM_Z, 1, 1)
    pixel = (torch.arange(height).view(1, height, 1) * width + torch.arange(width).view(1, 1, width))
    if mirror:
        pixel = height * width - 1 - pixel
    return (pixel * NUM_Z + channel).expand(NUM_Z, height, width).reshape(-1)  # [D]


def shift_jacobian(cell, z):
    return torch.autograd.functional.jacobian(lambda v: cell.shift(v.unsqueeze(0)).squeeze(0), z)


@pytest.mark.parametrize("which", ["cell1", "cell2"])
def test_shift_is_strictly_autoregressive_in_the_documented_order(which):
    paired = make_cell(seed=1, mu_boost=20.0, conv_boost=2.0, dtype=torch.float64)
    cell = getattr(paired, which)
    z = random_z(2, shape=(NUM_Z, 4, 4), dtype=torch.float64)
    jacobian = shift_jacobian(cell, z).reshape(z.numel(), z.numel())  # [D_out, D_in]
    keys = order_keys(4, 4, mirror=(which == "cell2"))
    allowed = keys.view(1, -1) < keys.view(-1, 1)  # input strictly before output
    assert torch.all(jacobian[~allowed] == 0)
    assert (jacobian[allowed] != 0).float().mean() > 0.3  # non-trivial dependence
    same_pixel_lower_channel = jacobian.view(NUM_Z, 16, NUM_Z, 16).diagonal(dim1=1, dim2=3)
    assert torch.all(same_pixel_lower_channel[1, 0] != 0)  # channel 1 sees channel 0 of its pixel
    other_order = order_keys(4, 4, mirror=(which == "cell1"))
    wrong = other_order.view(1, -1) >= other_order.view(-1, 1)
    assert torch.any(jacobian[wrong] != 0)  # the other cell's ordering does not fit


def test_forward_log_det_is_zero_and_context_is_ignored():
    paired = make_cell(seed=0)
    z = random_z(0)
    z_new, log_det = paired(z, torch.randn(3, 8, 4, 4))
    assert torch.equal(log_det, torch.zeros_like(z))
    assert torch.equal(paired(z)[0], z_new)
    expected = z - paired.cell1.shift(z)
    expected = expected - paired.cell2.shift(expected)
    assert torch.equal(z_new, expected)


# ---------------------------------------------------------------- inversion

def sequential_inverse(cell, z_new, mirror):
    """Exact inverse, one element at a time in the flow's order (independent of the iteration)."""
    keys = order_keys(z_new.shape[2], z_new.shape[3], mirror)
    z = torch.zeros_like(z_new)
    for flat_index in torch.argsort(keys).tolist():
        value = z_new.flatten(1)[:, flat_index] + cell.shift(z).flatten(1)[:, flat_index]
        z = z.flatten(1).index_copy(1, torch.tensor([flat_index]), value.unsqueeze(1)).view_as(z_new)
    return z


@torch.no_grad()
def test_fixed_point_agrees_with_sequential_solve_in_float64():
    paired = make_cell(seed=3, mu_boost=50.0, conv_boost=3.0, dtype=torch.float64)
    z_new = random_z(3, dtype=torch.float64)
    for cell, mirror in ((paired.cell1, False), (paired.cell2, True)):
        exact = sequential_inverse(cell, z_new, mirror)
        iterated, residual = cell.invert(z_new)
        torch.testing.assert_close(iterated, exact, rtol=0, atol=1e-10)
        assert residual <= default_inversion_tol(torch.float64) * max(1.0, z_new.abs().max().item())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("mu_boost, conv_boost", [(1.0, 1.0), (50.0, 3.0)])
@torch.no_grad()
def test_round_trip_where_a_single_step_inverse_is_wrong(seed, mu_boost, conv_boost):
    paired = make_cell(seed=seed, mu_boost=mu_boost, conv_boost=conv_boost)
    z = random_z(seed + 10)
    z_new, _ = paired(z)
    one_step = z_new + paired.cell2.shift(z_new)
    one_step = one_step + paired.cell1.shift(one_step)
    assert (one_step - z).abs().max() > 1e-3  # so the iteration is what makes the inverse exact
    recovered, residual = paired.invert(z_new)
    scale = max(1.0, z.abs().max().item())
    assert (recovered - z).abs().max() <= 2e-6 * scale * mu_boost
    assert residual == (paired(recovered)[0] - z_new).abs().max().item()
    assert residual <= 1e-5 * scale


@torch.no_grad()
def test_iteration_is_exact_within_d_steps_and_cap_reports_honest_residual():
    paired = make_cell(seed=5, mu_boost=50.0, conv_boost=3.0, dtype=torch.float64)
    z_new = random_z(5, dtype=torch.float64)
    result = invert_additive_flow(paired.cell1.shift, z_new, tol=0.0)
    assert result.iterations <= z_new[0].numel()
    assert result.max_abs_residual < 1e-12
    capped = invert_additive_flow(paired.cell1.shift, z_new, tol=0.0, max_iter=1)
    assert capped.iterations == 1
    true_residual = (z_new - (capped.z - paired.cell1.shift(capped.z))).abs().max().item()
    assert capped.max_abs_residual == true_residual > 1e-3
    with pytest.raises(ValueError, match="tol"):
        invert_additive_flow(paired.cell1.shift, z_new, tol=-1.0)


@torch.no_grad()
def test_invert_flow_chain_of_two_paired_cells():
    cells = [make_cell(seed=7, mu_boost=10.0), make_cell(seed=8, mu_boost=10.0)]
    z_pre = random_z(7, shape=(2, NUM_Z, 6, 5))
    z_post = z_pre
    for paired in cells:
        z_post, _ = paired(z_post)
    recovered, residual = invert_flow_chain(cells, z_post)
    torch.testing.assert_close(recovered, z_pre, rtol=0, atol=1e-5)
    assert residual < 1e-5
    reversed_order, _ = invert_flow_chain(cells[::-1], z_post)
    assert (reversed_order - z_pre).abs().max() > 1e-3  # order matters


# ---------------------------------------------------------------- construction and modules

def test_state_dict_keys_and_shapes_match_reference_doc():
    paired = PairedCellAR(4, 16, 32)
    per_cell = [
        ("conv.convz.0.weight", (24, 4, 3, 3)), ("conv.convz.0.log_weight_norm", (24, 1, 1, 1)),
        ("conv.convz.2.weight", (24, 1, 5, 5)), ("conv.convz.2.log_weight_norm", (24, 1, 1, 1)),
        ("mu.conv_0.weight", (4, 24, 1, 1)), ("mu.conv_0.bias", (4,)),
        ("mu.conv_0.log_weight_norm", (4, 1, 1, 1)),
    ]
    expected = [(f"{cell}.{name}", shape) for cell in ("cell1", "cell2") for name, shape in per_cell]
    actual = [(name, tuple(tensor.shape)) for name, tensor in paired.state_dict().items()]
    assert actual == expected
    assert sum(p.numel() for p in paired.parameters()) == 2 * (24 * 36 + 24 + 24 * 25 + 24 + 4 * 24 + 8)


def test_initialisation_follows_pytorch_conv_defaults_in_doc_order():
    torch.manual_seed(11)
    paired = PairedCellAR(NUM_Z, 8, 32)
    torch.manual_seed(11)
    plain = [
        nn.Conv2d(4, 24, 3, padding=1, bias=False), nn.Conv2d(24, 24, 5, padding=2, groups=24, bias=False),
        nn.Conv2d(24, 4, 1, bias=True),
    ]
    plain += [nn.Conv2d(4, 24, 3, padding=1, bias=False),
              nn.Conv2d(24, 24, 5, padding=2, groups=24, bias=False), nn.Conv2d(24, 4, 1, bias=True)]
    ours = [paired.cell1.conv.convz[0], paired.cell1.conv.convz[2], paired.cell1.mu.conv_0,
            paired.cell2.conv.convz[0], paired.cell2.conv.convz[2], paired.cell2.mu.conv_0]
    for index, (conv, reference) in enumerate(zip(ours, plain)):
        assert torch.equal(conv.weight, reference.weight)
        if reference.bias is not None:
            assert torch.equal(conv.bias, reference.bias)
        masked = reference.weight * conv.mask
        norms = masked.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        coeff = 0.1 if index % 3 == 2 else 1.0
        torch.testing.assert_close(conv.log_weight_norm, torch.log(norms + 0.01) + math.log(coeff))


def test_masks_are_non_persistent_buffers_that_follow_to(test_device):
    paired = PairedCellAR(NUM_Z, 8, 32)
    conv = paired.cell2.conv.convz[0]
    assert "mask" in dict(conv.named_buffers()) and "mask" not in conv.state_dict()
    assert torch.equal(conv.mask, conv_mask(3, 4, 1, 24, zero_diag=True, mirror=True))
    assert paired.to(torch.float64).cell1.mu.conv_0.mask.dtype == torch.float64
    assert paired.to("meta").cell1.conv.convz[2].mask.device.type == "meta"
    moved = PairedCellAR(NUM_Z, 8, 32).to(test_device)
    z = random_z(0).to(test_device)
    z_new, log_det = moved(z)
    assert z_new.device.type == test_device.type and log_det.device.type == test_device.type
    with torch.no_grad():
        recovered, _ = moved.invert(z_new)
    torch.testing.assert_close(recovered, z, rtol=0, atol=1e-5)


def test_weight_normalized_is_refreshed_each_forward_and_deepcopy_works():
    conv = ARConv2d(4, 8, 3, padding=1, masked=True, zero_diag=True)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        conv.log_weight_norm.add_(0.5)
    output = conv(x)
    masked = conv.weight * conv.mask
    norms = masked.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = torch.exp(conv.log_weight_norm) * masked / (norms + 1e-5)
    torch.testing.assert_close(conv.weight_normalized, expected)
    assert conv.weight_normalized.requires_grad  # the spectral regulariser differentiates through it
    torch.testing.assert_close(output, nn.functional.conv2d(x, expected, padding=1))
    clone = copy.deepcopy(conv)
    assert torch.equal(clone(x), output)


def test_unmasked_arconv_is_a_plain_weight_normalised_conv():
    conv = ARConv2d(3, 5, 3, padding=1, bias=True)
    assert conv.mask is None
    norms = conv.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.log_weight_norm, torch.log(norms + 0.01))
    x = torch.randn(2, 3, 4, 4)
    expected_weight = (norms + 0.01) * conv.weight / (norms + 1e-5)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, expected_weight, conv.bias, padding=1))


def test_cell_rejects_bad_num_c():
    with pytest.raises(ValueError, match="num_c"):
        CellAR(4, 8, 30)


# ---------------------------------------------------------------- golden cifar_flows cells

def golden_flow_cells():
    folder = golden_case_dir("cifar_flows")
    golden = torch.load(folder / "golden.pt", weights_only=True)
    state = torch.load(folder / "checkpoint.pt", weights_only=False)["state_dict"]
    cells = []
    for group in range(golden["num_groups"]):
        prefix = f"nf_cells.{group}."
        paired = PairedCellAR(NUM_Z, 8, 8 * NUM_Z)
        paired.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        cells.append(paired)
    return golden, cells


@pytest.mark.parametrize("mode", ["eval", "train"])
@torch.no_grad()
def test_golden_flow_cells_forward_and_inverse(mode):
    golden, cells = golden_flow_cells()
    for group, paired in enumerate(cells):
        z_pre, z_post = golden[f"{mode}/z_pre_flow"][group], golden[f"{mode}/z_post_flow"][group]
        z_new, log_det = paired(z_pre)
        torch.testing.assert_close(z_new, z_post, rtol=1e-4, atol=1e-5)
        assert torch.equal(log_det, torch.zeros_like(z_pre))
        recovered, residual = invert_flow_chain([paired], z_post)
        torch.testing.assert_close(recovered, z_pre, rtol=1e-4, atol=1e-5)
        assert residual < 1e-5
