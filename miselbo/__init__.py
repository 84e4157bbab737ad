"""miselbo: multiple importance sampling ELBO for ensembles of encoders sharing one decoder.

The estimators (`miselbo.estimators`) work on log-weight tensors of any model; `miselbo.nvae`
holds an NVAE-compatible hierarchical VAE; the rest wires training and evaluation together.
"""

__version__ = "0.1.0"
