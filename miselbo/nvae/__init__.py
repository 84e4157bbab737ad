"""An NVAE-compatible hierarchical VAE, written from ../shared/docs/nvae-reference.md."""
