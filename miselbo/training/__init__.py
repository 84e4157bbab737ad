"""NVAE training, new encoders against a frozen decoder, and the train.py command line.

`main(argv)` is `python train.py argv...`; `train(argv)` returns a TrainResult (checkpoint path,
final test NELBO and −log p in nats) for pipelines.
"""
from miselbo.training.launch import main, train
from miselbo.training.session import TrainResult

__all__ = ["TrainResult", "main", "train"]
