"""Which power replicas count as live: one heard lately, unless its main loop has been busy
for as long as a silent one is given (a hung replica's circuits move on, as a dead one's do)."""

from __future__ import annotations

from types import SimpleNamespace

from services.power.main import PEER_SILENT_S, Power
from shared.messages import Message


def heard(peers: dict, data: dict, src: str = "power-b") -> dict:
    me = SimpleNamespace(rt=SimpleNamespace(src="power-a", cfg=SimpleNamespace(
        runtime={"stats_interval_s": 1.0})), peers=peers)
    Power.heard(me, Message(b"stats", src, 0, 0.0, data))
    return peers


def test_a_peer_reporting_is_live_and_one_stopping_leaves():
    assert "power-b" in heard({}, {"service": "power"})
    assert "power-b" in heard({}, {"service": "power", "busy_s": PEER_SILENT_S - 0.1})
    assert heard({"power-b": 1.0}, {"service": "power", "stopped": True}) == {}
    assert heard({}, {"service": "storage"}) == {}
    assert heard({}, {"service": "power"}, src="power-a") == {}  # itself


def test_a_peer_busy_as_long_as_a_silent_one_is_not_kept_alive():
    peers = heard({"power-b": 1.0}, {"service": "power", "busy_s": PEER_SILENT_S})
    assert peers == {"power-b": 1.0}  # not refreshed: it leaves when its time is up
