"""Data sets and loaders: the embedded mnist5k digits, torchvision MNIST and CIFAR-10 (`datasets`),
and the data sets of an NVAE clone (`nvae_clone`)."""
