"""Hypothesis profiles, chosen with the ``HYPOTHESIS_PROFILE`` environment variable.

- ``default`` (local runs): 100 examples per test, random, failures kept in
  ``.hypothesis/`` and replayed first on the next run.
- ``ci`` (``.ci/run`` exports it): the same 100 examples on every run (``derandomize``), no
  example database. A CI run on a clean clone tests exactly what the last one tested, so
  it goes red only when the code changed, and ``tests/test_fuzz.py`` stays within its
  budget (under 60 s on two cores).
- ``nightly``: random, 100 times the examples, for a long exploring run of the fuzzing
  suite: ``HYPOTHESIS_PROFILE=nightly nox -s tests -- tests/test_fuzz.py`` (about a
  quarter of an hour on two cores). What it finds is saved in ``.hypothesis/`` and
  replayed first by the next local run.
- ``stateful``: more runs of the state machines.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile(
    "ci", parent=settings.get_profile("default"), print_blob=True, derandomize=True, database=None
)
settings.register_profile("nightly", parent=settings.get_profile("default"), max_examples=10_000)
settings.register_profile("stateful", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
