"""Evaluation: exact perplexity (blocks and strided windows) and the `eval` job."""
