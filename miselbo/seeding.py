"""Seeds derived from integers, so that every random draw depends on what it is for (the run's
seed, a step or example index, a rank, a stream) and never on which process or worker makes it."""
import numpy as np

UINT64_MASK = (1 << 64) - 1
TRAINING_STREAMS = {"train": 0, "test": 1}


def mix_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence); each word is taken modulo 2^64."""
    entropy = [word & UINT64_MASK for word in words]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def step_seed(seed: int, global_step: int, rank: int, stream: str) -> int:
    """A 63-bit seed for one training (seed, global step, rank, split) combination; stream is
    "train" or "test"."""
    return mix_seed(seed, global_step, rank, TRAINING_STREAMS[stream])


def example_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for one evaluation example (or a batch starting at it) and one stream of draws."""
    return mix_seed(seed, index, stream)
