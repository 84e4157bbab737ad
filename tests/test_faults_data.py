"""Damaged torchvision data files (MNIST idx files, CIFAR-10 pickle batches) end in one DataError
paragraph that names the file, says it is truncated or corrupt and how to get a good copy; never
torchvision's bare AssertionError, and never "the download failed" for files that are there."""
import gzip
import hashlib
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch

from miselbo.data.datasets import load_dataset
from miselbo.errors import DataError

MNIST_COUNTS = {"train": 100, "t10k": 10}


def idx_bytes(array, sizes=None):
    """An MNIST idx file: 00 00 08 ndim, big-endian uint32 sizes (the array's unless given), bytes."""
    sizes = array.shape if sizes is None else sizes
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", size) for size in sizes)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_root(tmp_path):
    """A small intact MNIST under tmp_path/MNIST/raw (100 training and 10 test digits)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for prefix, count in MNIST_COUNTS.items():
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes(generator.integers(0, 256, size=(count, 28, 28))))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(count) % 10))
    return tmp_path


@pytest.fixture
def no_mnist_download(monkeypatch):
    """Files that are there must never trigger a download."""
    from torchvision import datasets

    def refuse(self):
        raise AssertionError("torchvision tried to download MNIST although its files are there")
    monkeypatch.setattr(datasets.MNIST, "download", refuse)


def _images(count=100, size=28):
    return np.full((count, size, size), 7)


MNIST_DAMAGE = {  # file -> new content, and what the message must say about it
    "garbage": ("train-images-idx3-ubyte", bytes(range(256)) * 40,
                "is corrupt: it does not start with the bytes 00 00 08 03 of an MNIST image file"),
    "truncated": ("train-images-idx3-ubyte", idx_bytes(_images())[:3000],
                  "is truncated: its header announces 100 images of 28x28 pixels (78416 bytes) but the "
                  "file holds 3000 bytes"),
    "header claims more": ("train-images-idx3-ubyte", idx_bytes(_images(), sizes=(120, 28, 28)),
                           "is truncated: its header announces 120 images"),
    "header claims fewer": ("train-images-idx3-ubyte", idx_bytes(_images(), sizes=(80, 28, 28)),
                            "is corrupt: it holds 15680 bytes more than the 80 images"),
    "empty": ("t10k-labels-idx1-ubyte", b"", "is truncated: it holds 0 bytes"),
    "short header": ("train-labels-idx1-ubyte", bytes([0, 0, 8, 1, 0]), "is truncated: it holds 5 bytes"),
    "labels out of range": ("train-labels-idx1-ubyte", idx_bytes(np.full(100, 200)),
                            "is corrupt: 100 of its labels lie outside 0..9 (e.g. 200 at item 0)"),
    "not 28x28": ("train-images-idx3-ubyte", idx_bytes(_images(size=32)),
                  "is not MNIST: its header announces images of 32x32 pixels"),
    "still gzipped": ("train-images-idx3-ubyte", gzip.compress(idx_bytes(_images())),
                      "is still gzip-compressed: unpack it with gunzip"),
}


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize("damage", sorted(MNIST_DAMAGE))
def test_a_damaged_mnist_file_is_named_with_how_to_get_a_good_copy(mnist_root, no_mnist_download,
                                                                   damage, download):
    file_name, content, problem = MNIST_DAMAGE[damage]
    path = mnist_root / "MNIST" / "raw" / file_name
    path.write_bytes(content)
    train = not file_name.startswith("t10k")
    with pytest.raises(DataError) as raised:
        load_dataset("mnist", str(mnist_root), train=train, download=download)
    message = str(raised.value)
    assert message.startswith(f"--dataset mnist: the MNIST file {path} {problem}"), message
    assert "Delete it and run once with internet access" in message
    assert f"--data {mnist_root}" in message and "--dataset mnist5k" in message
    assert "download failed" not in message and "\n" not in message


def test_image_and_label_files_of_different_lengths_are_named_together(mnist_root, no_mnist_download):
    raw = mnist_root / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(9) % 10))
    with pytest.raises(DataError) as raised:
        load_dataset("mnist", str(mnist_root), train=False, download=True)
    message = str(raised.value)
    assert (f"{raw / 't10k-images-idx3-ubyte'} (10 images) and {raw / 't10k-labels-idx1-ubyte'} "
            f"(9 labels) do not belong together") in message
    assert "Delete both" in message


def test_an_intact_small_mnist_still_loads(mnist_root, no_mnist_download):
    assert len(load_dataset("mnist", str(mnist_root), train=True, download=True)) == 100
    assert len(load_dataset("mnist", str(mnist_root), train=False, download=False)) == 10


def test_a_damaged_older_processed_mnist_is_named(tmp_path, no_mnist_download):
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(b"not a torch file")
    with pytest.raises(DataError) as raised:
        load_dataset("mnist", str(tmp_path), train=True, download=True)
    message = str(raised.value)
    assert f"torchvision cannot read the files in {processed}" in message
    assert "damaged or not MNIST" in message and "\n" not in message


def test_missing_mnist_files_are_still_reported_as_missing(mnist_root):
    (mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="the data set is not in .* downloading is switched off"):
        load_dataset("mnist", str(mnist_root), train=True, download=False)


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_BATCHES = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]


def _md5(path):
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """Small CIFAR-10 pickle batches (4 images each) that torchvision itself reads: its expected
    MD5s are pointed at these files."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for name in CIFAR_BATCHES:
        batch = {"data": generator.integers(0, 256, size=(4, 3072), dtype=np.uint8),
                 "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    _expect_current_md5s(monkeypatch, folder)
    return tmp_path


def _expect_current_md5s(monkeypatch, folder):
    from torchvision import datasets
    monkeypatch.setattr(datasets.CIFAR10, "train_list",
                        [[name, _md5(folder / name)] for name in CIFAR_BATCHES[:5]])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                   "md5": _md5(folder / "batches.meta")})


def _download_fails(monkeypatch):
    from torchvision import datasets

    def offline(self):
        raise URLError("no route to host")
    monkeypatch.setattr(datasets.CIFAR10, "download", offline)


def test_small_cifar_batches_load_through_torchvision(cifar_root):
    train = load_dataset("cifar10", str(cifar_root), train=True, download=False)
    test = load_dataset("cifar10", str(cifar_root), train=False, download=False)
    assert (len(train), len(test)) == (20, 4)
    source = pickle.loads((cifar_root / "cifar-10-batches-py" / "test_batch").read_bytes())["data"][2]
    assert torch.equal(test[2][0], torch.from_numpy(source.reshape(3, 32, 32)).float() / 255)


@pytest.mark.parametrize("download", [False, True])
def test_a_truncated_cifar_batch_is_named_with_how_to_get_a_good_copy(cifar_root, monkeypatch, download):
    _download_fails(monkeypatch)
    batch = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError) as raised:
        load_dataset("cifar10", str(cifar_root), train=False, download=download)
    message = str(raised.value)
    assert message.startswith(f"--dataset cifar10: the CIFAR-10 file {batch} is truncated or corrupt: "
                              f"it holds 500 bytes and its MD5 is not the one torchvision expects")
    assert "cifar-10-python.tar.gz" in message and f"--data {cifar_root}" in message
    assert "not in" not in message and "\n" not in message
    assert ("Downloading a fresh copy failed: <urlopen error no route to host>" in message) == download


def test_a_damaged_cifar_batch_is_replaced_when_the_download_works(cifar_root, monkeypatch):
    from torchvision import datasets
    batch = cifar_root / "cifar-10-batches-py" / "test_batch"
    intact = batch.read_bytes()
    batch.write_bytes(intact[:-10])

    def fresh_copy(self):
        batch.write_bytes(intact)
    monkeypatch.setattr(datasets.CIFAR10, "download", fresh_copy)
    assert len(load_dataset("cifar10", str(cifar_root), train=False, download=True)) == 4


def test_a_cifar_batch_torchvision_cannot_unpickle_is_reported(cifar_root, monkeypatch):
    folder = cifar_root / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(b"\x80\x04garbage")
    _expect_current_md5s(monkeypatch, folder)  # damaged before its MD5 was taken
    with pytest.raises(DataError) as raised:
        load_dataset("cifar10", str(cifar_root), train=True, download=False)
    message = str(raised.value)
    assert f"torchvision cannot read the files in {folder} (UnpicklingError" in message
    assert "damaged or not CIFAR-10" in message and "\n" not in message
