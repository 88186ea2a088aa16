"""A short soak: wall-clock meters for half a minute; every line exactly once, the WAL within
its bound. No timing is asserted (the soak's latency and RSS figures are reported only)."""

import pytest

from bench.soak import soak


@pytest.mark.timeout(600)
def test_short_soak_is_exact_and_keeps_the_wal_bounded(tmp_path):
    r = soak(tmp_path, minutes=0.5, rate=20_000, wal_max_mb=2, quiet=True)
    assert r["exact"], {k: r[k] for k in ("lines", "invalid", "per_meter", "rejected")}
    assert r["lines"] == 0.5 * 60 * 20_000
    assert r["invalid"] > 0 and r["rejected"] == {"out_of_range": r["invalid"]}
    # the bound, plus what one transaction may add before the writer looks again
    assert r["wal_peak_mb"] <= 2 + 4, r["samples"]
