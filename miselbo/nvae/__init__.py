"""An NVAE-compatible hierarchical VAE, described in docs/nvae.md."""
