"""Shared by every test module."""

from __future__ import annotations

import os

from hypothesis import settings

# `make test`: the same examples every run, so a red CI can be reproduced; `make fuzz`: a longer search
# with fresh random draws (HYPOTHESIS_PROFILE=explore).
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=5000, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
