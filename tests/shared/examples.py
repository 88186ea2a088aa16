"""How long the property tests here run: ``HYPOTHESIS_EXAMPLES`` examples each, 200 by default
(seconds); for a long run by hand, e.g. ``HYPOTHESIS_EXAMPLES=50000 ./run-tests
tests/shared/test_parsing_property.py``. No deadline (the machine is shared: no test asserts
timing), no example database written into the worktree. Applied per test, not as a global
profile, so other test folders keep their own settings."""

import os

from hypothesis import HealthCheck, settings

PROPERTY = settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 200)), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])
