"""NVAE's building blocks (docs/nvae.md 3): weight-normalised convolution, batch-norm variants,
the operation table, skip connections, squeeze-excitation, residual and combiner cells.

Module and attribute names follow NVAE so that state_dict keys match its checkpoints
(docs/nvae.md 7.1).

Deliberate deviation: loading a state_dict into a `Conv2D` with data-dependent initialisation marks
that initialisation done, so loaded or resumed weights are never overwritten by a re-init on the
first forward (NVAE's quirk, docs/nvae.md 3.2 and 11.1, would destroy trained `res_elu` weights).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from miselbo.nvae.config import CHANNEL_MULT

WEIGHT_NORM_EPS = 1e-5
LOG_WEIGHT_NORM_INIT_EPS = 1e-2
DATA_INIT_STD_SCALE = 5.0
BN_EPS = 1e-5
BN_MOMENTUM = 0.05
RESIDUAL_SCALE = 0.1
SE_MIN_HIDDEN = 4
SE_REDUCTION = 16


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """||w_o|| per output filter, [C_out, 1, 1, 1] (one fused norm: fewer autograd nodes than
    sqrt(sum(w * w)), same value up to float rounding)."""
    return torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True)


def _all_reduce_mean(tensor: torch.Tensor) -> None:
    """Average `tensor` in place over the default process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """x2 nearest-neighbour up-sampling."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class Conv2D(nn.Conv2d):
    """Weight-normalised convolution: y = conv(x, w_hat), w_hat_o = exp(g_o) w_o / (||w_o|| + 1e-5).

    With weight_norm=False, w_hat = w and, as in NVAE, the same Parameter is also registered as
    `weight_normalized` (two state_dict entries, one parameter). With data_init=True the first
    forward sets bias and log_weight_norm from the data unless weights were loaded (docs/nvae.md 3.2).
    A frozen layer (neither parameter requires a gradient: the decoder of --train_new_q), and any
    layer run under torch.no_grad() (evaluation), reuses w_hat until a parameter changes in place
    (torch.no_grad() updates, load_state_dict) or is replaced (.to()); a change made through
    `.data`, which autograd does not track, is not seen until the next forward with gradients.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = False, data_init: bool = False,
                 weight_norm: bool = True):
        super().__init__(C_in, C_out, kernel_size, stride, padding, dilation, groups, bias)
        if data_init and not weight_norm:
            raise ValueError("Conv2D: data_init needs weight_norm (it sets log_weight_norm)")
        self.weight_norm = weight_norm
        self.data_init = data_init
        self.init_done = not data_init
        if weight_norm:
            with torch.no_grad():
                init = torch.log(_filter_norms(self.weight) + LOG_WEIGHT_NORM_INIT_EPS)
                self.log_weight_norm = nn.Parameter(init)  # [C_out, 1, 1, 1]
                self.weight_normalized = self.normalize_weight()
        else:
            self.log_weight_norm = None
            self.weight_normalized = self.weight  # registers the alias (docs/nvae.md 7.1)

    def normalize_weight(self) -> torch.Tensor:
        """w_hat = exp(log_weight_norm) * w / (||w_o|| + 1e-5), or w itself without weight norm."""
        if not self.weight_norm:
            return self.weight
        scale = torch.exp(self.log_weight_norm) / (_filter_norms(self.weight) + WEIGHT_NORM_EPS)  # [C_out, 1, 1, 1]
        return self.weight * scale  # one product of the full weight, forward and backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.init_done:
            self.initialize_from_data(x)
        if self.weight_norm:
            key = self._frozen_weight_key()
            if key is None or key != getattr(self, "_frozen_key", None):
                self.weight_normalized = self.normalize_weight()  # read by the spectral regulariser
                self._frozen_key = key
        return F.conv2d(x, self.weight_normalized, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def _frozen_weight_key(self) -> tuple | None:
        """What weight_normalized was computed from when it needs no graph: a frozen layer (neither
        parameter requires a gradient, e.g. the decoder of --train_new_q) or a forward without
        gradients; None for a trained layer with gradients on, whose normalised weight must be
        recomputed at every forward to carry the graph."""
        trained = self.weight.requires_grad or self.log_weight_norm.requires_grad
        if trained and torch.is_grad_enabled():
            return None
        # in-place changes bump _version; .to() and load_state_dict(assign=True) change data_ptr;
        # a weight made under inference_mode cannot be saved for a later backward; a trained
        # layer's no-grad weight is never reused once gradients are on (the key is then None)
        return (self.weight._version, self.log_weight_norm._version, self.weight.data_ptr(),
                self.log_weight_norm.data_ptr(), self.weight.dtype, torch.is_inference_mode_enabled(),
                trained)

    def initialize_from_data(self, x: torch.Tensor) -> None:
        """bias = -m / (st + 1e-5), log_weight_norm = -ln(st + 1e-5), where m and st = 5 std are the
        per-channel mean and (unbiased) std of conv(x, w / (||w|| + 1e-5)), averaged over processes."""
        with torch.no_grad():
            unit_weight = self.weight / (_filter_norms(self.weight) + WEIGHT_NORM_EPS)
            out = F.conv2d(x, unit_weight, None, self.stride, self.padding, self.dilation, self.groups)
            mean = torch.mean(out, dim=(0, 2, 3))  # [C_out]
            std = DATA_INIT_STD_SCALE * torch.std(out, dim=(0, 2, 3))  # [C_out]
            _all_reduce_mean(mean)
            _all_reduce_mean(std)
            if self.bias is not None:
                self.bias.copy_(-mean / (std + WEIGHT_NORM_EPS))
            self.log_weight_norm.copy_(-torch.log(std.view(-1, 1, 1, 1) + WEIGHT_NORM_EPS))
        self.init_done = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "log_weight_norm" in state_dict:
            self.init_done = True  # loaded weights are final: no data-dependent re-init

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if not self.weight_norm:  # keep the rule-W alias pointing at the (possibly new) Parameter
            self._parameters["weight_normalized"] = self.weight
        else:  # the cached normalised weight follows .to() / .double() like the parameters
            with torch.no_grad():
                self.weight_normalized = fn(self.weight_normalized.detach())
        return module

    def __getstate__(self):
        # After a forward `weight_normalized` is a non-leaf tensor, which copy.deepcopy refuses.
        state = super().__getstate__()
        if isinstance(state.get("weight_normalized"), torch.Tensor):
            state["weight_normalized"] = state["weight_normalized"].detach()
        return state


class BatchNorm(nn.Module):
    """NVAE's wrapped (sync) batch norm: one child `bn`, so keys read `<name>.bn.*` (docs/nvae.md 3.3)."""

    def __init__(self, num_features: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class BNSwish(nn.BatchNorm2d):
    """Batch norm followed by swish, y = BN(x) * sigmoid(BN(x)); keys sit directly under its name.

    Note: nn.SyncBatchNorm.convert_sync_batchnorm would replace it by a plain SyncBatchNorm and drop
    the swish; convert these modules with their own subclass instead.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM):
        super().__init__(num_features, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


# ----------------------------------------------------------------------------- operations

def _conv_stride(stride: int) -> int:
    if stride not in (1, 2, -1):
        raise ValueError(f"op stride must be 1, 2 or -1 (x2 up-sampling), got {stride}")
    return abs(stride)


class ELUConv(nn.Module):
    """res_elu: y = conv_0(U(ELU(x))), U = x2 nearest up-sampling when stride = -1; data-init conv."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__()
        self.upsample = stride == -1
        self.conv_0 = Conv2D(C_in, C_out, kernel_size, stride=_conv_stride(stride), padding=padding,
                             dilation=dilation, bias=True, data_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.elu(x)
        if self.upsample:
            out = upsample_nearest(out)
        return self.conv_0(out)


class BNELUConv(nn.Module):
    """res_bnelu: y = conv_0(U(ELU(BN(x))))."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__()
        self.upsample = stride == -1
        self.bn = BatchNorm(C_in)
        self.conv_0 = Conv2D(C_in, C_out, kernel_size, stride=_conv_stride(stride), padding=padding,
                             dilation=dilation, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.elu(self.bn(x))
        if self.upsample:
            out = upsample_nearest(out)
        return self.conv_0(out)


class BNSwishConv(nn.Module):
    """res_bnswish(5): y = conv_0(U(BNSwish(x)))."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__()
        self.upsample = stride == -1
        self.bn_act = BNSwish(C_in)
        self.conv_0 = Conv2D(C_in, C_out, kernel_size, stride=_conv_stride(stride), padding=padding,
                             dilation=dilation, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn_act(x)
        if self.upsample:
            out = upsample_nearest(out)
        return self.conv_0(out)


class ConvBNSwish(nn.Module):
    """conv = Sequential(Conv2D without bias or weight norm, BNSwish)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Sequential(
            Conv2D(C_in, C_out, kernel_size, stride, padding, dilation, groups, bias=False,
                   weight_norm=False),
            BNSwish(C_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class InvertedResidual(nn.Module):
    """mconv_*: [U], BN, 1x1 ConvBNSwish to h = round(C_in ex), k x k grouped ConvBNSwish, 1x1 conv, BN.

    Groups: h if g == 0 (depthwise) else g. No internal residual addition (docs/nvae.md 3.5).
    """

    def __init__(self, C_in: int, C_out: int, stride: int, ex: int, dil: int, k: int, g: int):
        super().__init__()
        hidden = int(round(C_in * ex))
        groups = hidden if g == 0 else g
        layers = [nn.UpsamplingNearest2d(scale_factor=2)] if stride == -1 else []
        layers += [
            BatchNorm(C_in, eps=BN_EPS, momentum=BN_MOMENTUM),
            ConvBNSwish(C_in, hidden, kernel_size=1),
            ConvBNSwish(hidden, hidden, kernel_size=k, stride=_conv_stride(stride), groups=groups,
                        dilation=dil),
            Conv2D(hidden, C_out, 1, 1, 0, bias=False, weight_norm=False),
            BatchNorm(C_out, momentum=BN_MOMENTUM),
        ]
        self.hidden_dim = hidden
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _inverted_residual(ex: int, k: int, g: int):
    return lambda C_in, C_out, stride: InvertedResidual(C_in, C_out, stride, ex=ex, dil=1, k=k, g=g)


OPS = {
    "res_elu": lambda C_in, C_out, stride: ELUConv(C_in, C_out, 3, stride, 1),
    "res_bnelu": lambda C_in, C_out, stride: BNELUConv(C_in, C_out, 3, stride, 1),
    "res_bnswish": lambda C_in, C_out, stride: BNSwishConv(C_in, C_out, 3, stride, 1),
    "res_bnswish5": lambda C_in, C_out, stride: BNSwishConv(C_in, C_out, 3, stride, 2, 2),
    "mconv_e6k5g0": _inverted_residual(ex=6, k=5, g=0),
    "mconv_e3k5g0": _inverted_residual(ex=3, k=5, g=0),
    "mconv_e3k5g8": _inverted_residual(ex=3, k=5, g=8),
    "mconv_e6k11g0": _inverted_residual(ex=6, k=11, g=0),
}


def make_op(name: str, C_in: int, C_out: int, stride: int) -> nn.Module:
    """The operation `name` of the table (docs/nvae.md 3.4), with a clear error for unknown names."""
    if name not in OPS:
        raise ValueError(f"unknown NVAE operation {name!r}; known: {sorted(OPS)}")
    return OPS[name](C_in, C_out, stride)


# ----------------------------------------------------------------------------- skips, SE, cells

def stride_of(cell_type: str) -> int:
    """1 for normal*/combiner*, 2 for down*, -1 (x2 up-sampling) for up* cell types (docs/nvae.md 2.3)."""
    if cell_type.startswith(("normal", "combiner")):
        return 1
    if cell_type.startswith("down"):
        return 2
    if cell_type.startswith("up"):
        return -1
    raise ValueError(f"unknown cell type {cell_type!r} (expected normal*, combiner*, down* or up*)")


class FactorizedReduce(nn.Module):
    """C_in -> C_out at half resolution: concat of four stride-2 1x1 convs of swish(x), each on x
    shifted by (0,0), (1,1), (0,1), (1,0) pixels (docs/nvae.md 3.6)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        quarter = C_out // 4
        self.conv_1 = Conv2D(C_in, quarter, 1, stride=2, padding=0, bias=True)
        self.conv_2 = Conv2D(C_in, quarter, 1, stride=2, padding=0, bias=True)
        self.conv_3 = Conv2D(C_in, quarter, 1, stride=2, padding=0, bias=True)
        self.conv_4 = Conv2D(C_in, C_out - 3 * quarter, 1, stride=2, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(x)
        parts = [self.conv_1(out), self.conv_2(out[:, :, 1:, 1:]), self.conv_3(out[:, :, :, 1:]),
                 self.conv_4(out[:, :, 1:, :])]
        return torch.cat(parts, dim=1)


class UpSample(nn.Module):
    """x2 bilinear up-sampling with align_corners=True."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def get_skip_connection(C: int, stride: int, channel_mult: int = CHANNEL_MULT) -> nn.Module:
    """Identity (stride 1), FactorizedReduce C -> mult C (stride 2), or up-sample + 1x1 WN-conv
    C -> C / mult without bias (stride -1)."""
    if stride == 1:
        return nn.Identity()
    if stride == 2:
        return FactorizedReduce(C, int(channel_mult * C))
    if stride == -1:
        return nn.Sequential(UpSample(), Conv2D(C, int(C / channel_mult), kernel_size=1, bias=False))
    raise ValueError(f"get_skip_connection: stride must be 1, 2 or -1, got {stride}")


class SE(nn.Module):
    """Squeeze-excitation: y = x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2), hidden max(C // 16, 4)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        hidden = max(C_out // SE_REDUCTION, SE_MIN_HIDDEN)
        self.se = nn.Sequential(nn.Linear(C_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, C_out),
                                nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.se(torch.mean(x, dim=(2, 3)))  # [B, C]
        return x * gate.view(x.shape[0], -1, 1, 1)


class Cell(nn.Module):
    """Residual cell: y = skip(x) + 0.1 * SE(op_n(... op_1(x))) (docs/nvae.md 3.8)."""

    def __init__(self, C_in: int, C_out: int, cell_type: str, arch: list[str], use_se: bool):
        super().__init__()
        self.cell_type = cell_type
        stride = stride_of(cell_type)
        self.skip = get_skip_connection(C_in, stride)
        self.use_se = use_se
        self._ops = nn.ModuleList()
        for index, op_name in enumerate(arch):
            op_stride = stride if index == 0 else 1
            op_in = C_in if index == 0 else C_out
            self._ops.append(make_op(op_name, op_in, C_out, op_stride))
        if use_se:
            self.se = SE(C_out, C_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        for op in self._ops:
            x = op(x)
        if self.use_se:
            x = self.se(x)
        return skip + RESIDUAL_SCALE * x


class EncCombinerCell(nn.Module):
    """Encoder combiner: (x1, x2) -> x1 + conv(x2); x1 the stored bottom-up feature, x2 the decoder
    state; conv is a 1x1 WN-conv C_in2 -> C_out with bias (C_in1 unused)."""

    def __init__(self, C_in1: int, C_in2: int, C_out: int, cell_type: str):
        super().__init__()
        self.cell_type = cell_type
        self.conv = Conv2D(C_in2, C_out, kernel_size=1, stride=1, padding=0, bias=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 + self.conv(x2)


class DecCombinerCell(nn.Module):
    """Decoder combiner: (x1, x2) -> conv(concat(x1, x2)); x1 the decoder state, x2 the latent z;
    conv is a 1x1 WN-conv C_in1 + C_in2 -> C_out with bias."""

    def __init__(self, C_in1: int, C_in2: int, C_out: int, cell_type: str):
        super().__init__()
        self.cell_type = cell_type
        self.conv = Conv2D(C_in1 + C_in2, C_out, kernel_size=1, stride=1, padding=0, bias=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x1, x2], dim=1))
