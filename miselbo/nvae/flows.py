"""NVAE's additive autoregressive flow cells, their masked convolutions and their inverse (docs/nvae.md 4).

A flow cell maps z to z_new = z - mu(z), where mu is strictly autoregressive in the order
"pixel in raster order, then channel ascending" (mirrored cells reverse the pixel order). Its
Jacobian is unit-triangular, so log_det = 0, and z = z_new + mu(z) is solved by fixed-point
iteration, exact after at most D = C*H*W steps (docs/nvae.md 4.6).
"""
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_NORM_EPS = 1e-5
LOG_WEIGHT_NORM_INIT_EPS = 1e-2
FLOW_EXPANSION = 6
FLOW_KERNEL = 5
MU_WEIGHT_INIT_COEFF = 0.1
# Default inversion tolerance, in machine epsilons of z's dtype, relative to max(1, max|z_new|):
# 4.8e-7 in float32 (the iteration's round-off floor is about 1 eps), 8.9e-16 in float64.
DEFAULT_INVERSION_TOL_EPS = 4.0


def default_inversion_tol(dtype: torch.dtype) -> float:
    """Relative stopping tolerance used when tol is None: 4 * machine epsilon of dtype."""
    return DEFAULT_INVERSION_TOL_EPS * torch.finfo(dtype).eps


def channel_mask(c_in: int, g_in: int, c_out: int, zero_diag: bool) -> torch.Tensor:
    """Centre-tap connectivity [c_out, c_in // g_in]: output block i sees input channels < i
    (and i itself unless zero_diag); blocks as in docs/nvae.md 4.1."""
    if not (c_in % c_out == 0 or c_out % c_in == 0):
        raise ValueError(f"channel_mask: c_in={c_in} and c_out={c_out} must divide one another")
    if g_in == 1:
        mask = torch.ones(c_out, c_in)
        if c_out >= c_in:
            ratio = c_out // c_in
            for i in range(c_in):
                rows = slice(i * ratio, (i + 1) * ratio)
                mask[rows, i + 1:] = 0
                if zero_diag:
                    mask[rows, i] = 0
        else:
            ratio = c_in // c_out
            for i in range(c_out):
                mask[i, (i + 1) * ratio:] = 0
                if zero_diag:
                    mask[i, i * ratio:(i + 1) * ratio] = 0
        return mask
    if g_in == c_in:
        return torch.zeros(c_out, 1) if zero_diag else torch.ones(c_out, 1)
    raise ValueError(f"channel_mask: groups must be 1 or c_in={c_in}, got {g_in}")


def conv_mask(kernel_size: int, c_in: int, g_in: int, c_out: int, zero_diag: bool,
              mirror: bool) -> torch.Tensor:
    """Kernel mask [c_out, c_in // g_in, k, k]: rows above the centre, the centre row left of
    the centre, and channel_mask at the centre; flipped along both kernel axes if mirror."""
    if kernel_size % 2 != 1:
        raise ValueError(f"conv_mask: kernel_size must be odd, got {kernel_size}")
    middle = (kernel_size - 1) // 2
    mask = torch.ones(c_out, c_in // g_in, kernel_size, kernel_size)
    mask[:, :, middle:, :] = 0
    mask[:, :, middle, :middle] = 1
    mask[:, :, middle, middle] = channel_mask(c_in, g_in, c_out, zero_diag)
    if mirror:
        mask = torch.flip(mask, dims=(2, 3))
    return mask


class ARConv2d(nn.Conv2d):
    """Masked WN convolution (docs/nvae.md 4.2): y = conv(x, exp(g) * (w*m) / (||(w*m)_o|| + 1e-5)).

    The mask is a non-persistent buffer (follows .to(), absent from the state_dict). The
    normalised weight of the latest forward is kept in `weight_normalized` for the spectral
    regulariser. Without gradients (the fixed-point inversions of evaluation call it many times) it
    is reused while the parameters and the mask are unchanged (in place: _version; replaced:
    data_ptr); with gradients on and a parameter requiring one it is recomputed at every forward.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = False, masked: bool = False,
                 zero_diag: bool = False, mirror: bool = False):
        super().__init__(c_in, c_out, kernel_size, stride, padding, dilation, groups, bias)
        mask = conv_mask(kernel_size, c_in, groups, c_out, zero_diag, mirror) if masked else None
        self.register_buffer("mask", mask, persistent=False)
        with torch.no_grad():
            init = torch.log(self._filter_norms(self._masked_weight()) + LOG_WEIGHT_NORM_INIT_EPS)
            self.log_weight_norm = nn.Parameter(init)  # [C_out, 1, 1, 1]
            self.weight_normalized = self.normalized_weight()

    def _masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    @staticmethod
    def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.sum(weight * weight, dim=(1, 2, 3), keepdim=True))  # [C_out, 1, 1, 1]

    def normalized_weight(self) -> torch.Tensor:
        """w_hat = exp(log_weight_norm) * w' / (||w'_o|| + 1e-5), w' = weight * mask."""
        masked = self._masked_weight()
        return torch.exp(self.log_weight_norm) * masked / (self._filter_norms(masked) + WEIGHT_NORM_EPS)

    def _no_graph_key(self) -> tuple | None:
        """What a graph-free weight_normalized was computed from; None when it must carry a graph."""
        trained = self.weight.requires_grad or self.log_weight_norm.requires_grad
        if trained and torch.is_grad_enabled():
            return None
        mask = (None, None) if self.mask is None else (self.mask._version, self.mask.data_ptr())
        return (self.weight._version, self.log_weight_norm._version, self.weight.data_ptr(),
                self.log_weight_norm.data_ptr(), *mask, self.weight.dtype, torch.is_inference_mode_enabled(),
                trained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._no_graph_key()
        if key is None or key != getattr(self, "_weight_key", None):
            self.weight_normalized = self.normalized_weight()
            self._weight_key = key
        return F.conv2d(x, self.weight_normalized, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def __getstate__(self):
        # A forward leaves a non-leaf tensor here, which copy.deepcopy refuses; keep only its value.
        state = super().__getstate__()
        state["weight_normalized"] = state["weight_normalized"].detach()
        return state


class ELUConv(nn.Module):
    """x -> conv_0(ELU(x)) with a masked ARConv2d, log_weight_norm ln(coeff) higher (docs/nvae.md 4.3)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int = 0, dilation: int = 1,
                 masked: bool = True, zero_diag: bool = True, weight_init_coeff: float = 1.0,
                 mirror: bool = False):
        super().__init__()
        self.conv_0 = ARConv2d(c_in, c_out, kernel_size, stride=1, padding=padding, dilation=dilation,
                               bias=True, masked=masked, zero_diag=zero_diag, mirror=mirror)
        with torch.no_grad():
            self.conv_0.log_weight_norm.add_(math.log(weight_init_coeff))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_0(F.elu(x))


class ARInvertedResidual(nn.Module):
    """convz = [masked 3x3 (zero_diag), ELU, masked depthwise k x k, ELU]; the context is ignored
    (docs/nvae.md 4.4)."""

    def __init__(self, inz: int, inf: int, ex: int = FLOW_EXPANSION, dil: int = 1,
                 k: int = FLOW_KERNEL, mirror: bool = False):
        super().__init__()
        del inf  # NVAE's flows take a context size but never use the context
        self.hidden_dim = int(round(inz * ex))
        hidden = self.hidden_dim
        self.convz = nn.Sequential(
            ARConv2d(inz, hidden, 3, padding=1, masked=True, zero_diag=True, mirror=mirror),
            nn.ELU(),
            ARConv2d(hidden, hidden, k, padding=dil * (k - 1) // 2, dilation=dil, groups=hidden,
                     masked=True, zero_diag=False, mirror=mirror),
            nn.ELU(),
        )

    def forward(self, z: torch.Tensor, ftr: torch.Tensor | None = None) -> torch.Tensor:
        return self.convz(z)


class InversionResult(NamedTuple):
    z: torch.Tensor  # the pre-image, same shape as z_new
    max_abs_residual: float  # max |z_new - (z - mu(z))|
    iterations: int  # number of fixed-point updates made


def invert_additive_flow(shift, z_new: torch.Tensor, tol: float | None = None,
                         max_iter: int | None = None) -> InversionResult:
    """Solve z - shift(z) = z_new by z <- z_new + shift(z), from z = z_new, batched.

    Stops when max|z_new - (z - shift(z))| <= tol * max(1, max|z_new|) (tol None: 4 machine
    epsilons of z_new's dtype), when an iterate repeats exactly, or after max_iter updates (default
    D = C*H*W, exact for a strictly autoregressive shift). Call it under torch.no_grad() unless
    gradients through the unrolled iteration are wanted.
    """
    if tol is None:
        tol = default_inversion_tol(z_new.dtype)
    if tol < 0:
        raise ValueError(f"invert_additive_flow: tol must be >= 0, got {tol}")
    if max_iter is None:
        max_iter = z_new[0].numel()
    if max_iter < 0:
        raise ValueError(f"invert_additive_flow: max_iter must be >= 0, got {max_iter}")
    threshold = tol * max(1.0, z_new.abs().max().item())
    z = z_new
    for iteration in range(max_iter + 1):
        shift_z = shift(z)
        residual = (z_new - (z - shift_z)).abs().max().item()
        if residual <= threshold or iteration == max_iter:
            break
        z_next = z_new + shift_z
        if torch.equal(z_next, z):
            break
        z = z_next
    return InversionResult(z, residual, iteration)


class CellAR(nn.Module):
    """Additive AR flow step z_new = z - mu(z), mu = mu_head(conv(z)), log_det = 0 (docs/nvae.md 4.5)."""

    def __init__(self, num_z: int, num_ftr: int, num_c: int, arch=None, mirror: bool = False):
        super().__init__()
        if num_c % num_z != 0:
            raise ValueError(f"CellAR: num_c={num_c} must be a multiple of num_z={num_z}")
        del arch  # unused, as in NVAE
        self.conv = ARInvertedResidual(num_z, num_ftr, ex=FLOW_EXPANSION, mirror=mirror)
        self.mu = ELUConv(self.conv.hidden_dim, num_z, kernel_size=1, padding=0, masked=True,
                          zero_diag=False, weight_init_coeff=MU_WEIGHT_INIT_COEFF, mirror=mirror)

    def shift(self, z: torch.Tensor) -> torch.Tensor:
        """mu(z) [B, L, h, w]; ELU is applied twice in a row on the depthwise output, as in NVAE."""
        return self.mu(self.conv(z))

    def forward(self, z: torch.Tensor, ftr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z_new = z - self.shift(z)
        return z_new, torch.zeros_like(z_new)

    def invert(self, z_new: torch.Tensor, tol: float | None = None,
               max_iter: int | None = None) -> tuple[torch.Tensor, float]:
        """z with z - mu(z) = z_new, and max|z_new - (z - mu(z))| (see invert_additive_flow)."""
        result = invert_additive_flow(self.shift, z_new, tol, max_iter)
        return result.z, result.max_abs_residual


class PairedCellAR(nn.Module):
    """cell1 (raster order) then cell2 (mirrored order); log_det = sum of both = 0 (docs/nvae.md 4.5)."""

    def __init__(self, num_z: int, num_ftr: int, num_c: int, arch=None):
        super().__init__()
        self.cell1 = CellAR(num_z, num_ftr, num_c, arch, mirror=False)
        self.cell2 = CellAR(num_z, num_ftr, num_c, arch, mirror=True)

    def forward(self, z: torch.Tensor, ftr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det1 = self.cell1(z, ftr)
        z, log_det2 = self.cell2(z, ftr)
        return z, log_det1 + log_det2

    def invert(self, z_new: torch.Tensor, tol: float | None = None,
               max_iter: int | None = None) -> tuple[torch.Tensor, float]:
        """Invert cell2 then cell1; the residual is max|forward(z) - z_new| of the whole pair."""
        return invert_flow_chain([self], z_new, tol, max_iter)


def invert_flow_chain(cells: Sequence[PairedCellAR], z_post: torch.Tensor,
                      tol: float | None = None,
                      max_iter: int | None = None) -> tuple[torch.Tensor, float]:
    """z_pre = f_1^-1(... f_n^-1(z_post)) for a group's flow cells f_1..f_n (applied in that order).

    Each CellAR is inverted by fixed-point iteration (tol, max_iter as in invert_additive_flow);
    the returned residual is max|f_n(... f_1(z_pre)) - z_post|, measured by one forward pass.
    """
    z = z_post
    for paired in reversed(cells):
        for cell in (paired.cell2, paired.cell1):
            z, _ = cell.invert(z, tol, max_iter)
    z_pre = z
    for paired in cells:
        z, _ = paired(z)
    return z_pre, (z - z_post).abs().max().item()
