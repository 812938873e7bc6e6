"""Models: loading config, tokenizer and weights (hub or local), their summary, text generation."""
