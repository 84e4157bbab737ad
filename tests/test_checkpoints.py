"""NVAE checkpoints: safe reads, refusals, strict loading, atomic saves, architecture checks.

Unit tests use a small stand-in model (one rule-W alias, one batch-norm layer, a fingerprint);
the golden tests at the end load the reference checkpoints into miselbo.nvae.model.AutoEncoder.
"""
import argparse
import errno
import hashlib
import io
import logging
import os
import pathlib
import re
import zipfile

import pytest
import torch
from torch import nn

from conftest import golden_case_dir
from miselbo.storage import checkpoints
from miselbo.storage import safe_io
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import (ARCHITECTURE_FLAGS, CHECKPOINT_BACKFILL, NVAE_CHECKPOINT_KEYS,
                                         architecture_differences, checkpoint_decoder_fingerprint, fill_defaults,
                                         load_nvae_checkpoint, read_checkpoint, require_same_architecture,
                                         save_nvae_checkpoint)
from miselbo.storage.safe_io import UnwritableFolderError, sidecar_path

GOLDEN_CASES = {"mnist_small": (514, 24), "cifar_flows": (626, 27)}  # entries, weight_normalized aliases
ARCH_TABLE = {"normal_enc": ["res_bnswish"], "ar_nn": [""]}


class StandInModel(nn.Module):
    """Encoder conv + decoder conv with a rule-W alias + decoder BN; widths from args."""

    def __init__(self, args):
        super().__init__()
        width = args.num_channels_enc
        self.enc_conv = nn.Conv2d(1, width, 3, padding=1)
        self.dec_conv = nn.Conv2d(width, 1, 1, bias=False)
        self.dec_conv.weight_normalized = self.dec_conv.weight  # same Parameter under two names
        self.dec_bn = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.dec_bn(self.dec_conv(self.enc_conv(x)))

    def decoder_fingerprint(self):
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            if name.startswith("dec_"):
                digest.update(name.encode() + tensor.cpu().numpy().tobytes())
        return digest.hexdigest()


def stand_in_args(**overrides):
    values = dict(ARCHITECTURE_FLAGS, num_channels_enc=4, seed=3, save="/tmp/x/eval-exp", batch_size=2)
    values.update(overrides)
    return argparse.Namespace(**values)


def trained_stand_in(args):
    """A stand-in model after one optimiser step and one train-mode pass (so every state moved)."""
    torch.manual_seed(0)
    model = StandInModel(args)
    optimizer = torch.optim.Adamax(model.parameters(), lr=0.01, eps=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-4)
    model(torch.randn(2, 1, 5, 5)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save_stand_in(path, args=None, **kwargs):
    args = args or stand_in_args()
    model, optimizer, scheduler = trained_stand_in(args)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    written = save_nvae_checkpoint(path, model, args, optimizer=optimizer, scheduler=scheduler,
                                   grad_scaler=scaler, epoch=3, global_step=42,
                                   arch_instance=ARCH_TABLE, **kwargs)
    return written, model, optimizer, scheduler


def load_stand_in(path, **kwargs):
    return load_nvae_checkpoint(path, model_factory=StandInModel, **kwargs)


def rewrite_unverified(path, checkpoint):
    """Replace a checkpoint file with `checkpoint` via plain torch.save, without a sidecar."""
    sidecar_path(path).unlink(missing_ok=True)
    torch.save(checkpoint, path)


# ----------------------------------------------------------------------------- save / load


def test_save_then_load_is_bit_identical(tmp_path):
    written, model, optimizer, scheduler = save_stand_in(tmp_path / "checkpoint.pt")
    loaded, args, checkpoint = load_stand_in(written)
    assert list(checkpoint)[:8] == list(NVAE_CHECKPOINT_KEYS)
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(restored) == list(original) == list(checkpoint["state_dict"])
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert checkpoint["epoch"] == 3 and checkpoint["global_step"] == 42
    assert checkpoint["arch_instance"] == ARCH_TABLE and vars(args) == vars(stand_in_args())
    assert checkpoint["grad_scalar"]["scale"] == 1024.0
    assert checkpoint["scheduler"] == scheduler.state_dict()
    saved_state = checkpoint["optimizer"]["state"]
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(saved_state[index][name]), torch.as_tensor(value))
    assert not loaded.training


def test_saved_alias_shares_storage_and_resumes_optimizer(tmp_path):
    written, model, optimizer, _ = save_stand_in(tmp_path / "checkpoint.pt")
    state_dict = read_checkpoint(written)["state_dict"]
    assert state_dict["dec_conv.weight"].data_ptr() == state_dict["dec_conv.weight_normalized"].data_ptr()
    resumed = torch.optim.Adamax(model.parameters(), lr=0.01, eps=1e-3)
    resumed.load_state_dict(read_checkpoint(written)["optimizer"])
    assert resumed.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_save_into_a_folder_writes_checkpoint_pt_with_sidecar(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path)
    assert written == tmp_path / "checkpoint.pt"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert safe_io.verify_sha256(written)
    load_stand_in(tmp_path)  # a folder is accepted for loading too


def test_miselbo_entry_round_trips_and_gives_the_fingerprint(tmp_path):
    entry = {"decoder_fingerprint": "ab" * 32, "role": "q", "seed": 7,
             "parent_path": "/runs/p/checkpoint.pt", "parent_fingerprint": "ab" * 32}
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt", miselbo=entry)
    model, _, checkpoint = load_stand_in(written)
    assert checkpoint["miselbo"] == entry
    assert checkpoint_decoder_fingerprint(checkpoint, model) == "ab" * 32
    checkpoint.pop("miselbo")
    assert checkpoint_decoder_fingerprint(checkpoint, model) == model.decoder_fingerprint()


def test_save_refuses_args_the_safe_loader_could_not_read(tmp_path):
    args = stand_in_args(data=pathlib.Path("/tmp/data"))
    with pytest.raises(ValueError, match=r"args\.data .*PosixPath"):
        save_stand_in(tmp_path / "checkpoint.pt", args=args)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_load_does_not_touch_the_global_rng_and_lands_on_the_device(tmp_path, test_device):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model, _, _ = load_stand_in(written, map_location=test_device)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(tensor.device.type == test_device.type for tensor in model.state_dict().values())


# ----------------------------------------------------------------------------- refusals


class TouchOnLoad:
    """Unpickling this object creates a file (pathlib.Path.touch)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


class ShellOnLoad:
    """Unpickling this object runs a shell command that creates a file (os.system)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


@pytest.mark.parametrize("payload_class, named", [(TouchOnLoad, "pathlib.Path"), (ShellOnLoad, "system")])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, payload_class, named):
    marker = tmp_path / "pwned"
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    checkpoint = read_checkpoint(written)
    checkpoint["args"].data = payload_class(marker)
    rewrite_unverified(written, checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_stand_in(written)
    message = str(caught.value)
    assert not marker.exists()
    assert named in message and "--trust_checkpoint" in message and str(written) in message
    # the payload is real: trusting the file runs it (what it returns, e.g. os.system's 0, then
    # fails the field check of args.data, which is the right answer too)
    try:
        read_checkpoint(written, trust=True)
    except CheckpointError as err:
        assert "field args.data" in str(err)
    assert marker.exists()


def test_golden_checkpoints_need_the_allow_list_and_read_safely_with_it():
    for name, (entries, aliases) in GOLDEN_CASES.items():
        path = golden_case_dir(name) / "checkpoint.pt"
        with pytest.raises(Exception, match="argparse.Namespace"):
            torch.load(path, weights_only=True)  # torch alone refuses the pickled Namespace
        checkpoint = read_checkpoint(path)
        assert list(checkpoint) == list(NVAE_CHECKPOINT_KEYS)
        assert isinstance(checkpoint["args"], argparse.Namespace)
        assert checkpoint["args"].dataset == {"mnist_small": "mnist", "cifar_flows": "cifar10"}[name]
        state_dict = checkpoint["state_dict"]
        assert len(state_dict) == entries
        assert sum(key.endswith(".weight_normalized") for key in state_dict) == aliases


def _truncation_offsets(size):
    return [0, 1, 10, size // 3, 2 * size // 3, size - 1]


def test_truncated_checkpoint_is_refused_at_every_offset(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    full = written.read_bytes()
    sidecar_path(written).unlink()
    for offset in _truncation_offsets(len(full)):
        written.write_bytes(full[:offset])
        with pytest.raises(CheckpointError, match="truncated or corrupted") as caught:
            read_checkpoint(written)
        assert str(written) in str(caught.value), offset


def test_truncated_golden_checkpoint_is_refused(tmp_path):
    full = (golden_case_dir("mnist_small") / "checkpoint.pt").read_bytes()
    target = tmp_path / "checkpoint.pt"
    for offset in _truncation_offsets(len(full)):
        target.write_bytes(full[:offset])
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            read_checkpoint(target)


def _zip_member_offset(data, member_suffix):
    """Byte offset of a zip member's data inside `data`."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    info = next(item for item in archive.infolist() if item.filename.endswith(member_suffix))
    header = data[info.header_offset: info.header_offset + 30]
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_with_sidecar_is_a_sha256_mismatch(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    _flip_byte(written, _zip_member_offset(written.read_bytes(), "data/0"))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch.*corrupted or was changed after writing"):
        read_checkpoint(written)


def test_sidecar_catches_a_flip_in_tensor_data_that_torch_misses(tmp_path):
    written, model, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    _flip_byte(written, _zip_member_offset(written.read_bytes(), "data/0"))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        read_checkpoint(written)
    sidecar_path(written).unlink()
    silently_changed = read_checkpoint(written)["state_dict"]  # zip members carry no checked CRC
    assert any(not torch.equal(silently_changed[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("where", ["pickle opcode", "end of central directory"])
def test_flipped_byte_without_sidecar_is_reported_as_corruption(tmp_path, where):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    data = written.read_bytes()
    offset = _zip_member_offset(data, "data.pkl") if where == "pickle opcode" else data.rfind(b"PK\x05\x06")
    sidecar_path(written).unlink()
    _flip_byte(written, offset)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(written)


def test_failed_save_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    written, model, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    before = written.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(safe_io.SafeIOError, match="No space left on device"):
        save_nvae_checkpoint(written, model, stand_in_args(), epoch=4, arch_instance=ARCH_TABLE)
    monkeypatch.undo()
    assert written.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert load_stand_in(written)[2]["epoch"] == 3


def test_save_into_a_read_only_folder_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from test_safe_io import make_folder_refuse_new_files
    written, model, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    before = written.read_bytes()
    how = make_folder_refuse_new_files(tmp_path, monkeypatch)
    try:
        with pytest.raises(UnwritableFolderError, match="does not accept new files"):
            save_nvae_checkpoint(written, model, stand_in_args(), epoch=4, arch_instance=ARCH_TABLE)
        monkeypatch.undo()
    finally:
        tmp_path.chmod(0o755)
    assert written.read_bytes() == before, how
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert load_stand_in(written)[2]["epoch"] == 3


def test_missing_file_and_folder_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as caught:
        read_checkpoint(tmp_path / "absent.pt")
    assert str(tmp_path / "absent.pt") in str(caught.value)
    with pytest.raises(CheckpointError, match="holds no checkpoint.pt") as caught:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    sidecar_path(written).unlink()
    written.chmod(0o000)
    try:
        readable_anyway = os.access(written, os.R_OK)  # root reads regardless of mode
        if readable_anyway:
            def refuse(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied", str(written))
            monkeypatch.setattr(safe_io, "open", refuse, raising=False)  # shadows builtins.open
        with pytest.raises(CheckpointError, match="cannot be read: Permission denied"):
            read_checkpoint(written)
    finally:
        written.chmod(0o644)


@pytest.mark.parametrize("content, expected", [
    ([1, 2, 3], "holds a list"),
    ({"model": {}}, r"lacks state_dict, args \(its keys: model\)"),
    ({"state_dict": {}, "args": {"dataset": "mnist"}}, "'args' is a dict"),
    ({"state_dict": [], "args": argparse.Namespace()}, "'state_dict' is a list"),
])
def test_not_an_nvae_checkpoint(tmp_path, content, expected):
    target = tmp_path / "other.pt"
    torch.save(content, target)
    with pytest.raises(CheckpointError, match="is not an NVAE checkpoint") as caught:
        read_checkpoint(target)
    assert re.search(expected, str(caught.value)), str(caught.value)


# ----------------------------------------------------------------------------- strict loading


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    checkpoint = read_checkpoint(written)
    del checkpoint["state_dict"]["enc_conv.bias"]
    checkpoint["state_dict"]["enc_extra.weight"] = torch.zeros(2)
    rewrite_unverified(written, checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_stand_in(written)
    message = str(caught.value)
    assert "1 missing key(s): enc_conv.bias" in message
    assert "1 unexpected key(s): enc_extra.weight" in message


def test_long_key_lists_are_cut_after_ten_with_the_count(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    checkpoint = read_checkpoint(written)
    for index in range(13):
        checkpoint["state_dict"][f"stray.{index:02d}"] = torch.zeros(1)
    rewrite_unverified(written, checkpoint)
    with pytest.raises(CheckpointError, match=r"13 unexpected key\(s\): stray\.00, .*stray\.09, "
                                              r"\.\.\. \(3 more\)"):
        load_stand_in(written)


def test_wrong_shapes_name_the_key_and_both_shapes(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")  # width 4
    checkpoint = read_checkpoint(written)
    checkpoint["args"].num_channels_enc = 6
    rewrite_unverified(written, checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_stand_in(written)
    message = str(caught.value)
    assert "enc_conv.weight: checkpoint (4, 1, 3, 3) vs model (6, 1, 3, 3)" in message
    assert "dec_conv.weight_normalized: checkpoint (1, 4, 1, 1) vs model (1, 6, 1, 1)" in message


def test_missing_weight_normalized_alias_is_filled_and_logged(tmp_path, caplog):
    written, model, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    checkpoint = read_checkpoint(written)
    del checkpoint["state_dict"]["dec_conv.weight_normalized"]  # as in older NVAE checkpoints
    rewrite_unverified(written, checkpoint)
    with caplog.at_level(logging.DEBUG, logger="miselbo.storage.checkpoints"):
        loaded, _, _ = load_stand_in(written)
    assert "dec_conv.weight_normalized" in caplog.text
    assert torch.equal(loaded.dec_conv.weight_normalized, model.dec_conv.weight)


def test_alias_without_its_sibling_is_still_missing(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")
    checkpoint = read_checkpoint(written)
    del checkpoint["state_dict"]["dec_conv.weight_normalized"]
    del checkpoint["state_dict"]["dec_conv.weight"]
    rewrite_unverified(written, checkpoint)
    expected = r"2 missing key\(s\): dec_conv.weight, dec_conv.weight_normalized"
    with pytest.raises(CheckpointError, match=expected):
        load_stand_in(written)


# ----------------------------------------------------------------------------- args and architecture


def test_fill_defaults_fills_only_what_is_absent_and_copies():
    old = argparse.Namespace(dataset="mnist", num_mixture_dec=1)
    filled = fill_defaults(old)
    assert vars(filled) == {"dataset": "mnist", "num_mixture_dec": 1, "ada_groups": False,
                            "min_groups_per_scale": 1}
    assert vars(old) == {"dataset": "mnist", "num_mixture_dec": 1}


def test_architecture_flags_are_category_a_and_c_of_the_reference_doc():
    assert ARCHITECTURE_FLAGS == {
        "dataset": "mnist", "arch_instance": "res_mbconv", "num_nf": 0, "num_x_bits": 8,
        "num_latent_scales": 1, "num_groups_per_scale": 10, "num_latent_per_group": 20,
        "ada_groups": False, "min_groups_per_scale": 1, "num_channels_enc": 32,
        "num_preprocess_blocks": 2, "num_preprocess_cells": 3, "num_cell_per_cond_enc": 1,
        "num_channels_dec": 32, "num_postprocess_blocks": 2, "num_postprocess_cells": 3,
        "num_cell_per_cond_dec": 1, "num_mixture_dec": 10, "use_se": False, "res_dist": False}


def test_a_model_that_cannot_be_built_is_a_checkpoint_error(tmp_path):
    written, _, _, _ = save_stand_in(tmp_path / "checkpoint.pt")

    def refusing_factory(args):
        raise ValueError(f"unknown arch_instance {args.arch_instance!r}")

    expected = r"cannot build the model .*unknown arch_instance 'res_mbconv'"
    with pytest.raises(CheckpointError, match=expected):
        load_nvae_checkpoint(written, model_factory=refusing_factory)


def test_default_arch_table_matches_the_one_nvae_stored(tmp_path):
    golden = read_checkpoint(golden_case_dir("mnist_small") / "checkpoint.pt")
    args = stand_in_args(arch_instance=golden["args"].arch_instance)
    model, _, _ = trained_stand_in(args)
    written = save_nvae_checkpoint(tmp_path, model, args)
    assert read_checkpoint(written)["arch_instance"] == golden["arch_instance"]


def test_backfill_agrees_with_the_architecture_defaults():
    assert CHECKPOINT_BACKFILL == {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}
    for flag, value in CHECKPOINT_BACKFILL.items():
        assert ARCHITECTURE_FLAGS[flag] == value


def test_architecture_differences():
    parent = stand_in_args(dataset="cifar10", num_channels_dec=8, res_dist=True)
    assert architecture_differences(parent, stand_in_args(dataset="cifar10", num_channels_dec=8,
                                                          res_dist=True, seed=99, batch_size=7)) == []
    child = stand_in_args(dataset="cifar10", num_channels_dec=16, res_dist=False, num_x_bits=5)
    assert architecture_differences(parent, child) == [
        ("num_x_bits", 8, 5), ("num_channels_dec", 8, 16), ("res_dist", True, False)]


def test_missing_attributes_take_nvae_defaults():
    old = argparse.Namespace(dataset="cifar10")  # e.g. a checkpoint from before ada_groups existed
    all_defaults = argparse.Namespace(**{**ARCHITECTURE_FLAGS, "dataset": "cifar10"})
    assert architecture_differences(old, all_defaults) == []
    assert architecture_differences(old, argparse.Namespace(dataset="cifar10", ada_groups=True)) == [
        ("ada_groups", False, True)]


def test_num_mixture_dec_matters_only_for_mixture_outputs():
    assert architecture_differences(argparse.Namespace(dataset="mnist", num_mixture_dec=1),
                                    argparse.Namespace(dataset="mnist", num_mixture_dec=10)) == []
    assert architecture_differences(argparse.Namespace(dataset="cifar10", num_mixture_dec=1),
                                    argparse.Namespace(dataset="cifar10", num_mixture_dec=10)) == [
        ("num_mixture_dec", 1, 10)]


def test_require_same_architecture_names_the_flags():
    with pytest.raises(CheckpointError, match=r"--num_latent_per_group: 20 \(parent\) vs 4 \(new run\)"):
        require_same_architecture(argparse.Namespace(), argparse.Namespace(num_latent_per_group=4),
                                  "parent", "new run")
    require_same_architecture(argparse.Namespace(), argparse.Namespace(seed=5))


# ----------------------------------------------------------------------------- the real model


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_golden_checkpoint_loads_strictly_into_the_autoencoder(name):
    path = golden_case_dir(name) / "checkpoint.pt"
    model, args, checkpoint = load_nvae_checkpoint(path)
    assert not model.training
    restored = model.state_dict()
    assert list(restored) == list(checkpoint["state_dict"])
    for key, tensor in checkpoint["state_dict"].items():
        assert restored[key].shape == tensor.shape and torch.equal(restored[key], tensor), key
    assert architecture_differences(args, checkpoint["args"]) == []


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_golden_model_save_load_round_trip(name, tmp_path):
    model, args, checkpoint = load_nvae_checkpoint(golden_case_dir(name) / "checkpoint.pt")
    written = save_nvae_checkpoint(tmp_path, model, args, epoch=checkpoint["epoch"],
                                   global_step=checkpoint["global_step"])
    again, again_args, again_checkpoint = load_nvae_checkpoint(written)
    assert again_checkpoint["arch_instance"] == checkpoint["arch_instance"]
    assert vars(again_args) == vars(args)
    original, restored = checkpoint["state_dict"], again.state_dict()
    assert list(restored) == list(original)
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert checkpoint_decoder_fingerprint(again_checkpoint, again) == model.decoder_fingerprint()


def test_golden_checkpoint_without_weight_normalized_aliases_loads(tmp_path, caplog):
    """Older NVAE checkpoints lack the rule-W aliases; they are filled from `.weight` and listed."""
    checkpoint = read_checkpoint(golden_case_dir("mnist_small") / "checkpoint.pt")
    original = dict(checkpoint["state_dict"])
    aliases = [key for key in original if key.endswith(".weight_normalized")]
    for key in aliases:
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with caplog.at_level(logging.DEBUG, logger="miselbo.storage.checkpoints"):
        model, _, _ = load_nvae_checkpoint(tmp_path)
    assert f"filled {len(aliases)} weight_normalized aliases" in caplog.text
    assert all(key in caplog.text for key in aliases)
    restored = model.state_dict()
    assert list(restored) == list(original)
    assert all(torch.equal(restored[key], tensor) for key, tensor in original.items())
