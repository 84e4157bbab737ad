"""Running inside a clone of NVAE: NVAE's data sets.

Data sets this project does not load itself (omniglot, celeba_64, imagenet_32, ffhq, lsun_*, ...):
when a `datasets.py` that defines NVAE's `get_loaders_eval(dataset, args)` sits next to the running
script or on `sys.path` (a clone of NVAE), its loader provides the images. We call it once per data
set and root with `distributed=False`, keep the two data sets of the loaders it returns
(`(train_queue, valid_queue, num_classes)`) and serve their images through our own loaders, so
batch size, workers, distributed sampling and seeding stay ours. Item i is drawn with torch's
global generator seeded from (the data set's current seed, i) and restored afterwards, so the
random transforms of NVAE's loader (dynamic binarisation, flips) are reproducible and leave the
training draws alone. Only torch's generator is seeded (torchvision's transforms draw from it).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from miselbo.errors import DataError
from miselbo.nvae import config
from miselbo.nvae.config import default_nvae_args
from miselbo.seeding import UINT64_MASK, mix_seed

CLONE_DATASETS_FILE = "datasets.py"
_CLONE_MARKER = "def get_loaders_eval("  # NVAE's datasets.py defines get_loaders_eval(dataset, args)
_MODULE_NAME = "_miselbo_nvae_clone_datasets"


# ----------------------------------------------------------------------------- finding the clone

def _candidate_folders() -> list[Path]:
    """The running script's folder, then every sys.path entry ('' is the working directory)."""
    folders = []
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if script and script not in ("-c", "-m") and os.path.isfile(script):
        folders.append(Path(script).resolve().parent)
    folders += [Path(entry or os.getcwd()).resolve() for entry in sys.path if isinstance(entry, str)]
    return list(dict.fromkeys(folders))


def _looks_like_nvae(path: Path) -> bool:
    try:
        return _CLONE_MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def find_clone_datasets() -> Path | None:
    """The `datasets.py` of an NVAE clone next to the script or on sys.path, else None."""
    for folder in _candidate_folders():
        candidate = folder / CLONE_DATASETS_FILE
        if candidate.is_file() and _looks_like_nvae(candidate):
            return candidate
    return None


def outside_clone_advice() -> str:
    """What to do for an NVAE data set this project does not load itself."""
    return ("NVAE's own loader provides it when train.py and miselbo_eval.py run inside a clone of "
            "NVAE: copy train.py, model.py and miselbo_eval.py next to NVAE's datasets.py and run "
            "them there (NVAE's datasets.py imports lmdb: `pip install lmdb`)")


@functools.lru_cache(maxsize=None)
def _import_clone_module(path: Path):
    """Import the clone's datasets.py (its folder first on sys.path, for its own imports)."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        raise DataError(f"the NVAE clone's {path} cannot be imported: {err}. NVAE's datasets module "
                        f"imports its requirements at import time, even for MNIST (lmdb among them); "
                        f"install the missing one, e.g. `pip install {err.name or 'lmdb'}`.") from None
    except Exception as err:  # the clone's own code: report it, do not hide it
        raise DataError(f"the NVAE clone's {path} failed on import: {type(err).__name__}: {err}.") from err
    sys.modules[_MODULE_NAME] = module
    return module


# ----------------------------------------------------------------------------- the clone's data

def _clone_splits(name: str, root: str) -> tuple[Dataset, Dataset]:
    """(training, test) data sets of NVAE's loaders for `name` under `root`."""
    path = find_clone_datasets()
    if path is None:
        raise DataError(f"--dataset {name}: no NVAE clone found (no {CLONE_DATASETS_FILE} defining "
                        f"get_loaders_eval next to the script or on sys.path); {outside_clone_advice()}.")
    return _splits_of(path, name, root)


@functools.lru_cache(maxsize=8)
def _splits_of(path: Path, name: str, root: str) -> tuple[Dataset, Dataset]:
    module = _import_clone_module(path)
    args = default_nvae_args(dataset=name, data=root, batch_size=1)
    args.distributed = False  # we shard ourselves; NVAE's sampler would need a process group
    try:
        train_queue, valid_queue = module.get_loaders_eval(name, args)[:2]
    except Exception as err:  # NotImplementedError for unknown names, I/O errors for missing files
        raise DataError(f"--dataset {name}: the NVAE clone's loader ({module.__file__}) failed with "
                        f"--data {root}: {type(err).__name__}: {err}. Check --data and that the "
                        f"clone's datasets.py knows this name.") from err
    return train_queue.dataset, valid_queue.dataset


class CloneImages(Dataset):
    """Items of a data set from NVAE's loader as (float image [C, H, W], label), seeded per index.

    `reseed(seed)` (called per epoch and in workers, as for our own data sets) fixes the draws:
    item i is produced with torch's generator seeded from (seed, i), restored afterwards.
    """

    def __init__(self, base: Dataset, name: str, indices: list[int] | None = None):
        self.base, self.name = base, name
        self.indices = list(range(len(base))) if indices is None else indices
        self.seed = 0

    def reseed(self, seed: int) -> None:
        self.seed = seed & UINT64_MASK

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        base_index = self.indices[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, base_index))
            item = self.base[base_index]
        image, label = _image_and_label(item)
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise DataError(f"--dataset {self.name}: the NVAE clone's loader gave "
                            f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))} for item "
                            f"{base_index}; expected a float tensor [C, H, W] in [0, 1].")
        return image.float(), label

    def take(self, max_examples: int | None) -> "CloneImages":
        """This data set restricted to `max_examples` evenly spaced items (i·N // k, i < k)."""
        if max_examples is not None and max_examples < 1:
            raise DataError(f"max_examples must be >= 1, got {max_examples}.")
        if max_examples is None or max_examples >= len(self):
            return self
        count = len(self)
        chosen = [self.indices[i * count // max_examples] for i in range(max_examples)]
        return CloneImages(self.base, self.name, chosen)


def _image_and_label(item) -> tuple:
    """(image, integer label) of a loader item: `(image, label, ...)`, or a bare image (label 0)."""
    if not isinstance(item, (tuple, list)):
        return item, 0
    label = item[1] if len(item) > 1 else 0
    try:
        return item[0], int(label)
    except (TypeError, ValueError, RuntimeError):  # a label that is no single number
        return item[0], 0


def clone_dataset(name: str, root: str, train: bool) -> CloneImages:
    """One split of `name` from the NVAE clone's loader, checked against the model's input format."""
    train_set, test_set = _clone_splits(name, str(root))
    images = CloneImages(train_set if train else test_set, name)
    if len(images) == 0:
        raise DataError(f"--dataset {name}: the NVAE clone's loader gave an empty "
                        f"{'training' if train else 'test'} set under --data {root}.")
    _require_model_shape(name, images[0][0])
    return images


def require_model_for(name: str) -> tuple[int, int, int]:
    """[C, size, size] of NVAE's model input for `name`; DataError if its table has no entry."""
    try:
        size = config.input_size(name)
    except ValueError:
        raise DataError(f"--dataset {name}: NVAE's model has no input size for this name (its table "
                        f"knows mnist, omniglot, cifar10, ffhq and celeba_<size>, imagenet_<size>, "
                        f"lsun_<...>_<size>), so NVAE's own train.py cannot build a model for it "
                        f"either.") from None
    return config.input_channels(name), size, size


def _require_model_shape(name: str, image: torch.Tensor) -> None:
    """Refuse images NVAE's model for `name` cannot take."""
    expected = require_model_for(name)
    if tuple(image.shape) != expected:
        raise DataError(f"--dataset {name}: the NVAE clone's loader gives images of shape "
                        f"{tuple(image.shape)}, but NVAE's model for {name} takes {list(expected)}.")
