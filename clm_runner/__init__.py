"""clm-runner: fine-tune causal language models from one readable recipe file."""

__version__ = "0.1.0"
