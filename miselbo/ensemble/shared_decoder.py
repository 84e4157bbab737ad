"""One decoder in memory for many members: `share_decoder` makes a member use another's decoder
modules and prior_ftr0 (the very objects); `uses_shared_decoder` tells whether two members do.
Used by the ensemble's loading (one decoder for S members) and by joint training (K encoders
against one frozen decoder)."""
from __future__ import annotations

import torch.nn as nn

from miselbo.nvae.model import DECODER_MODULE_NAMES, AutoEncoder


def _decoder_parts(model: AutoEncoder) -> dict:
    """name -> module or parameter of every decoder part the model has."""
    parts = {}
    for name in DECODER_MODULE_NAMES:
        value = getattr(model, name, None)
        if isinstance(value, (nn.Module, nn.Parameter)):
            parts[name] = value
    return parts


def share_decoder(source: AutoEncoder, target: AutoEncoder) -> None:
    """Make `target` use `source`'s decoder modules and prior_ftr0 (the very objects), in place.

    Afterwards the target's own decoder is unreferenced and freed; its encoder is untouched, and
    its forward passes score with the shared decoder. The layer lists (all_conv_layers, ...) are
    rebuilt so they do not keep the old decoder alive.
    """
    for name, part in _decoder_parts(source).items():
        setattr(target, name, part)
    target.collect_layers()


def uses_shared_decoder(a: AutoEncoder, b: AutoEncoder) -> bool:
    """True when a and b hold the very same decoder objects (see share_decoder)."""
    parts_a, parts_b = _decoder_parts(a), _decoder_parts(b)
    return parts_a.keys() == parts_b.keys() and all(parts_a[k] is parts_b[k] for k in parts_a)
