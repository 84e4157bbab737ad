"""The examples an evaluation scores, and the seeds that make it deterministic.

Every random choice depends on the seed and an example index, never on which process does the work:
item i of a data set is binarised (MNIST) or flipped with the data set's generator seeded from
example_seed(seed, i, STREAM_BINARISE); a batch starting at example i draws its samples from
example_seed(seed, i, STREAM_DRAWS) and its S2A / S2S subsets from example_seed(seed, i, STREAM_SUBSETS).
"""
from __future__ import annotations

import torch

from miselbo.errors import DataError
from miselbo.data.datasets import (check_batch_for_dataset, check_dataset_name, image_format, load_dataset,
                                   pre_process)
from miselbo.evaluation.members import LoadedMembers, evaluation_dataset_of
from miselbo.seeding import example_seed

STREAM_BINARISE, STREAM_DRAWS, STREAM_SUBSETS = 1, 2, 3


class EvaluationExamples:
    """The evaluation images as the model takes them, each drawn deterministically from its index.

    From a data set: item i is loaded with the data set's generator seeded from (seed, i), then
    quantised to num_x_bits (as NVAE's test loop does). From a tensor (programmatic use): the images
    as given, [N, C, H, W] in the model's input form. Every batch is checked against the data set's
    format (shape, channels, value range, binarity for Bernoulli data, NaN / inf).
    """

    def __init__(self, source, dataset: str, seed: int, num_x_bits: int):
        self.source, self.dataset, self.seed, self.num_x_bits = source, dataset, seed, num_x_bits

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Examples [start, stop) as a checked float batch [n, C, H, W]."""
        if isinstance(self.source, torch.Tensor):
            x = self.source[start:stop]
        else:
            images = []
            for index in range(start, stop):
                self.source.reseed(example_seed(self.seed, index, STREAM_BINARISE))
                images.append(self.source[index][0])
            x = pre_process(torch.stack(images), self.num_x_bits)
        check_batch_for_dataset(x, self.dataset, where=f"evaluation examples {start}..{stop - 1}")
        return x


def evaluation_examples(dataset: str | None, root: str, train: bool, num_examples: int | None, seed: int,
                        members: LoadedMembers, images: torch.Tensor | None = None) -> EvaluationExamples:
    """The examples to score: `images` if given, else the split of `dataset` (default: the data set
    the first checkpoint's run read), limited to num_examples evenly spaced items. Refuses a data set
    this project cannot load and one whose images do not fit the model's input."""
    name = dataset or evaluation_dataset_of(members.args)
    try:
        check_dataset_name(name)
    except DataError as err:
        if dataset is None:
            raise DataError(f"the checkpoints were trained on {name!r}, which this project cannot load "
                            f"({err}); pass --dataset.") from None
        raise
    config = members.models[0].config
    data_format, model_format = image_format(name), (config.input_channels, config.input_size)
    if (data_format.channels, data_format.size) != model_format:
        raise DataError(f"--dataset {name} gives {data_format.channels}-channel {data_format.size}x"
                        f"{data_format.size} images but the checkpoints' model ({config.dataset}) takes "
                        f"{model_format[0]}-channel {model_format[1]}x{model_format[1]} input.")
    if images is not None:
        source = images[:num_examples] if num_examples else images
    else:
        source = load_dataset(name, root, train=train, max_examples=num_examples)
    return EvaluationExamples(source, name, seed, config.num_x_bits)
