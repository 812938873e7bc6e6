"""clm-runner: fine-tune causal language models from one readable recipe file."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["PerplexityMetric", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import clm_runner` (and `clm-runner --help`) must not import evaluate or torch.
    if name == "PerplexityMetric":
        from clm_runner.eval.metric import PerplexityMetric

        return PerplexityMetric
    raise AttributeError(f"module 'clm_runner' has no attribute {name!r}")
