"""Hypothesis profiles for the property tests here: a moderate default that keeps the suite
fast, and ``HYPOTHESIS_PROFILE=thorough`` (``HYPOTHESIS_EXAMPLES=N`` to choose how many) for a
long run by hand. No deadline (the machine is shared: no test asserts timing) and no example
database written into the worktree."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=200, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", parent=settings.get_profile("default"),
                          max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 20_000)))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
