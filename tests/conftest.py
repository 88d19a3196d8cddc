"""Hypothesis: random exploration locally, the same examples on every run under CI=true.

CI and the mutation-testing runner (benchmarks/mutations) set ``CI``; a derandomized run
cannot fail on an example that a previous run did not try.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
