from __future__ import annotations

from collections import Counter

from services.ingest import allow


def test_empty_allow_list_allows_everyone():
    assert allow.allowed([], "203.0.113.9") and allow.allowed([], "::1")


def test_networks_single_addresses_ipv6_and_mapped_ipv4():
    nets = ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
    assert allow.allowed(nets, "10.200.3.4")
    assert allow.allowed(nets, "192.168.1.7") and not allow.allowed(nets, "192.168.1.8")
    assert allow.allowed(nets, "fd12::1") and not allow.allowed(nets, "fe80::1%eth0")
    assert allow.allowed(nets, "::ffff:10.1.2.3")  # an IPv4 peer on a dual-stack socket
    assert not allow.allowed(nets, "127.0.0.1")
    assert not allow.allowed(nets, "not an address")


def test_refusals_counted_each_time_logged_once_per_address(caplog, monkeypatch):
    monkeypatch.setattr(allow, "_logged", type(allow._logged)())
    monkeypatch.setattr(allow, "REMEMBERED", 100)
    counters: Counter = Counter()
    for _ in range(3):
        assert allow.refuse_source(["10.0.0.0/8"], "127.0.0.9", counters)
    assert not allow.refuse_source(["10.0.0.0/8"], "10.0.0.9", counters)
    assert counters["connections_refused_source"] == 3
    assert sum("127.0.0.9" in r.message for r in caplog.records) == 1
    for i in range(1000):  # many addresses: memory stays bounded
        allow.refuse_source(["10.0.0.0/8"], f"127.1.{i // 250}.{i % 250}", counters)
    assert len(allow._logged) == 100
