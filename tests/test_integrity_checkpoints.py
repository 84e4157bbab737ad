"""Checkpoint integrity: sidecars follow symlinks to the real file, non-regular files are refused
with their own message, concurrent atomic writers keep file and sidecar consistent, and damaged
checkpoints that are valid pickles are refused field by field before any model is built."""
import argparse
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from miselbo.storage.checkpoint_fields import (exact_parameter_count, parameter_upper_bound,
                                       validate_checkpoint_fields)
from miselbo.errors import CheckpointError
from miselbo.storage.checkpoints import load_nvae_checkpoint, read_checkpoint, save_nvae_checkpoint
from miselbo.nvae.config import default_nvae_args, get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.storage.safe_io import (ChecksumMismatchError, NotARegularFileError, atomic_write_bytes,
                             read_sidecar_digest, regular_file, sha256_of_file, sidecar_path,
                             verify_sha256)
from test_train_common import REPO_ROOT, quiet_env

TINY = dict(dataset="mnist", num_channels_enc=4, num_channels_dec=4, num_latent_scales=1,
            num_groups_per_scale=2, num_latent_per_group=2, num_preprocess_blocks=1,
            num_preprocess_cells=1, num_postprocess_blocks=1, num_postprocess_cells=1)


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A real tiny NVAE checkpoint with its sidecar, and copies of the tensors and args it was
    written from (taken before saving, so a test can compare what the loader hands back)."""
    args = default_nvae_args(**TINY)
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    written = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    written_args = dict(vars(args))
    path = save_nvae_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", model, args)
    return path, written, written_args


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_saved):
    return tiny_saved[0]


def _assert_same_tensors(loaded: dict, written: dict) -> None:
    assert sorted(loaded) == sorted(written)
    for name, tensor in written.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name].cpu(), tensor), name


def _flip_a_byte_in_the_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy_with_sidecar(source, folder):
    target = folder / "checkpoint.pt"
    target.write_bytes(source.read_bytes())
    sidecar_path(target).write_bytes(sidecar_path(source).read_bytes())
    return target


# ----------------------------------------------------------------------------- item 1: symlinks

def test_symlink_to_a_byte_flipped_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    real_folder = tmp_path / "real"
    real_folder.mkdir()
    corrupted = _copy_with_sidecar(tiny_checkpoint, real_folder)
    _flip_a_byte_in_the_middle(corrupted)
    link = tmp_path / "link.pt"  # no sidecar beside the link: before, it was read unverified
    link.symlink_to(corrupted)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch") as caught:
        read_checkpoint(link)
    assert "a symlink to" in str(caught.value) and str(corrupted) in str(caught.value)
    # the same refusal through a linked folder
    linked_folder = tmp_path / "linked_folder"
    linked_folder.symlink_to(real_folder, target_is_directory=True)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        read_checkpoint(linked_folder)


def test_symlink_to_an_intact_checkpoint_loads_and_verifies(tiny_saved, tmp_path):
    path, written, written_args = tiny_saved
    link = tmp_path / "link.pt"
    link.symlink_to(path)
    assert verify_sha256(link) is True
    checkpoint = read_checkpoint(link)
    _assert_same_tensors(checkpoint["state_dict"], written)
    assert vars(checkpoint["args"]) == written_args


def test_a_wrong_sidecar_beside_the_link_is_also_checked(tiny_checkpoint, tmp_path):
    link = tmp_path / "link.pt"
    link.symlink_to(tiny_checkpoint)
    sidecar_path(link).write_text("0" * 64 + "  link.pt\n")
    with pytest.raises(ChecksumMismatchError, match="link.pt.sha256"):
        verify_sha256(link)


def test_folder_pipe_and_device_are_refused_each_with_its_own_message(tmp_path):
    pipe = tmp_path / "pipe.pt"
    os.mkfifo(pipe)
    cases = [(tmp_path, "is a folder"), (pipe, "is a named pipe"),
             (os.devnull, "is a character device")]
    for path, message in cases:
        with pytest.raises(NotARegularFileError, match=message):
            regular_file(path)
    with pytest.raises(CheckpointError, match="named pipe"):  # would block forever if opened
        read_checkpoint(pipe)
    with pytest.raises(CheckpointError, match="character device"):
        read_checkpoint(os.devnull)
    link = tmp_path / "pipe_link.pt"
    link.symlink_to(pipe)
    with pytest.raises(NotARegularFileError, match="the symlink .* points to"):
        regular_file(link)


def test_dangling_symlink_is_reported_as_unreadable(tmp_path):
    link = tmp_path / "dangling.pt"
    link.symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(link)


# ----------------------------------------------------------------------------- item 2: writers

def test_concurrent_atomic_writers_leave_a_matching_sidecar(tmp_path, monkeypatch):
    """Forced interleaving: writer A pauses right after renaming its file in (before its sidecar);
    writer B then writes the same target. Unserialised, B would finish first and A's late sidecar
    would describe B's bytes; with the folder lock B waits for A, so the pair always matches."""
    import threading
    from miselbo.storage import safe_io
    target = tmp_path / "shared.bin"
    a_renamed, b_finished = threading.Event(), threading.Event()
    real_fsync = safe_io._fsync_folder

    def pausing_fsync(folder):
        real_fsync(folder)
        if threading.current_thread().name == "writer-a" and not a_renamed.is_set():
            a_renamed.set()
            b_finished.wait(timeout=1.0)  # times out when B is (correctly) blocked by the lock
    monkeypatch.setattr(safe_io, "_fsync_folder", pausing_fsync)

    def writer_b():
        a_renamed.wait(timeout=10)
        atomic_write_bytes(target, b"written by B")
        b_finished.set()
    threads = [threading.Thread(target=lambda: atomic_write_bytes(target, b"written by A"),
                                name="writer-a"), threading.Thread(target=writer_b, name="writer-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert target.read_bytes() == b"written by B"
    assert read_sidecar_digest(target) == sha256_of_file(target)
    assert verify_sha256(target)


# ----------------------------------------------------------------------------- item 5: fields

def _damaged(tiny_checkpoint, tmp_path, change):
    checkpoint = torch.load(tiny_checkpoint, weights_only=False)
    change(checkpoint)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    return path


def _set_arg(name, value):
    return lambda checkpoint: setattr(checkpoint["args"], name, value)


def _del_arg(name):
    return lambda checkpoint: delattr(checkpoint["args"], name)


def _first_weight(checkpoint):
    return next(key for key, value in checkpoint["state_dict"].items() if value.is_floating_point())


def _nan_weight(checkpoint):
    checkpoint["state_dict"][_first_weight(checkpoint)].view(-1)[0] = float("nan")


def _inf_weight(checkpoint):
    checkpoint["state_dict"][_first_weight(checkpoint)].view(-1)[-1] = float("inf")


def _non_tensor(checkpoint):
    checkpoint["state_dict"][_first_weight(checkpoint)] = [1.0, 2.0]


DAMAGE = [
    ("channels as string", _set_arg("num_channels_enc", "32"), "args.num_channels_enc", "'32' (str)"),
    ("channels as float", _set_arg("num_channels_dec", 4.0), "args.num_channels_dec", "4.0 (float)"),
    ("bool for int", _set_arg("num_latent_scales", True), "args.num_latent_scales", "True (bool)"),
    ("missing dataset", _del_arg("dataset"), "args.dataset", "missing"),
    ("missing channels", _del_arg("num_channels_enc"), "args.num_channels_enc", "missing"),
    ("int for switch", _set_arg("use_se", 1), "args.use_se", "1 (int)"),
    ("absurd groups", _set_arg("num_groups_per_scale", 10 ** 6), "args.num_groups_per_scale",
     r"in \[1, 128\]"),
    ("negative channels", _set_arg("num_channels_enc", -4), "args.num_channels_enc", r"in \[1, 4096\]"),
    ("NaN weight", _nan_weight, "state_dict", "NaN/inf"),
    ("inf weight", _inf_weight, "state_dict", "NaN/inf"),
    ("list for tensor", _non_tensor, "state_dict", "a tensor"),
    ("epoch as string", lambda c: c.__setitem__("epoch", "3"), "epoch", "'3' (str)"),
    ("negative step", lambda c: c.__setitem__("global_step", -1), "global_step", "-1 (int)"),
    ("optimizer list", lambda c: c.__setitem__("optimizer", [1]), "optimizer", "a dict or None"),
    ("miselbo list", lambda c: c.__setitem__("miselbo", [1]), "miselbo", "a dict"),
    ("unknown role", lambda c: c.__setitem__("miselbo", {"role": "boss"}), "miselbo.role", "'boss'"),
    ("short fingerprint", lambda c: c.__setitem__("miselbo", {"decoder_fingerprint": "abc"}),
     "miselbo.decoder_fingerprint", "64 lowercase hex"),
    ("resume not dict", lambda c: c.__setitem__("miselbo", {"resume": 5}), "miselbo.resume", "a dict"),
    ("NaN loss sum", lambda c: c.__setitem__("miselbo", {"resume": {"epoch_loss_sum": math.nan}}),
     "miselbo.resume.epoch_loss_sum", "finite"),
]


@pytest.mark.parametrize("label, change, field, found", DAMAGE, ids=[case[0] for case in DAMAGE])
def test_damaged_but_valid_pickle_is_refused_naming_field(tiny_checkpoint, tmp_path, label, change,
                                                           field, found):
    path = _damaged(tiny_checkpoint, tmp_path, change)
    with pytest.raises(CheckpointError) as caught:
        load_nvae_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and field in message, message
    assert "should be" in message
    assert found in message or re.search(found, message), message


def test_intact_checkpoint_passes_validation(tiny_saved):
    """The loader's model holds exactly the tensors the file was written from, under the same args."""
    path, written, written_args = tiny_saved
    model, args, _ = load_nvae_checkpoint(path)
    _assert_same_tensors(model.state_dict(), written)
    assert vars(args) == written_args


def test_huge_architecture_is_refused_before_allocation(tiny_checkpoint, tmp_path, monkeypatch):
    """Channels 4096 everywhere: about 1.4e10 parameters (52 GiB); refused by the meta count."""
    def widen(checkpoint):
        for name in ("num_channels_enc", "num_channels_dec"):
            setattr(checkpoint["args"], name, 4096)
    path = _damaged(tiny_checkpoint, tmp_path, widen)
    with pytest.raises(CheckpointError, match=r"at most 1,073,741,824 parameters") as caught:
        read_checkpoint(path)
    assert "args (architecture)" in str(caught.value)
    monkeypatch.setenv("MISELBO_MAX_MODEL_PARAMETERS", str(10 ** 12))
    read_checkpoint(path)  # the limit is the stated one: raised, the file reads


@pytest.mark.parametrize("overrides", [
    TINY, dict(dataset="cifar10"), dict(dataset="mnist", num_latent_scales=2, num_groups_per_scale=10,
                                        ada_groups=True, num_latent_per_group=20, use_se=True),
    dict(dataset="cifar10", num_nf=2, num_latent_per_group=64, num_channels_enc=8,
         num_channels_dec=8, num_latent_scales=1, num_groups_per_scale=3),
    dict(dataset="cifar10", num_nf=3, num_latent_per_group=1024, num_channels_enc=1,
         num_channels_dec=1, num_latent_scales=1, num_groups_per_scale=3, num_mixture_dec=100)])
def test_parameter_upper_bound_is_an_upper_bound(overrides):
    args = default_nvae_args(**overrides)
    assert exact_parameter_count(args) <= parameter_upper_bound(args)


def test_damaged_checkpoint_through_the_evaluator_exits_2_without_traceback(tiny_checkpoint, tmp_path):
    path = _damaged(tiny_checkpoint, tmp_path, _nan_weight)
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "miselbo_eval.py"), "--checkpoints",
                                str(path), "--save", str(tmp_path / "out")], cwd=REPO_ROOT,
                               env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr and "NaN/inf" in completed.stderr


# ----------------------------------------------------------------------------- found by trying to break it

def test_a_pipe_as_sidecar_is_refused_instead_of_blocking(tiny_checkpoint, tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(tiny_checkpoint.read_bytes())
    os.mkfifo(sidecar_path(target))
    with pytest.raises(CheckpointError, match="named pipe"):
        read_checkpoint(target)


def test_a_symlink_loop_is_named_as_such(tmp_path):
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="symlink that leads nowhere"):
        read_checkpoint(tmp_path / "a.pt")


@pytest.mark.parametrize("flags, phrase", [
    (["--num_channels_enc", "100000"], r"--num_channels_enc should be a whole number in \[1, 4096\]"),
    (["--num_channels_enc", "4000", "--num_channels_dec", "4000"], "the model should be a model of at most"),
    (["--num_groups_per_scale", "1000000"], "--num_groups_per_scale should be"),
])
def test_absurd_architecture_flags_are_refused_before_building(tmp_path, capsys, flags, phrase):
    from miselbo import training
    status = training.main(["--root", str(tmp_path), "--save", "absurd", "--dataset", "mnist5k", *flags])
    err = capsys.readouterr().err
    assert status == 2 and re.search(phrase, err) and "Traceback" not in err, err
    assert not (tmp_path / "eval-absurd").exists()


@pytest.mark.parametrize("name, value, phrase", [
    ("learning_rate", "fast", "args.learning_rate should be a number"),
    ("batch_size", -5, r"args.batch_size should be a whole number in \[1, 1000000\]"),
    ("save", 3, "args.save should be a string or None"),
])
def test_training_flags_in_args_are_checked_too(tiny_checkpoint, tmp_path, name, value, phrase):
    """Found by trying to break it: these loaded silently; a negative batch_size then reached the
    evaluator's batching."""
    path = _damaged(tiny_checkpoint, tmp_path, _set_arg(name, value))
    with pytest.raises(CheckpointError, match=phrase):
        read_checkpoint(path)
