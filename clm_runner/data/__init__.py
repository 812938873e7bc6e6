"""Data: raw text sources -> tokens -> blocks, cached on disk (or streamed)."""
