"""CURVE keys and the allowed-keys callback, on real files (the broker's ZAP use of them is
tested with real processes in tests/integration/test_security.py)."""

from __future__ import annotations

import dataclasses
import stat
from collections import Counter

import pytest
import zmq

from shared import auth, config
from shared.bus import secure_bind, secure_connect


def test_make_keys_secret_0600_public_copied_into_its_roles(tmp_path):
    public, secret = auth.make_keys(tmp_path, "ingest", ["publish", "subscribe"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(secret)
    assert sec is not None and zmq.auth.load_certificate(public) == (pub, None)
    for role, folder in auth.ROLES.items():
        copy = tmp_path / "allowed" / folder / "ingest.key"
        assert copy.exists() == (role in ("publish", "subscribe")), role
    with pytest.raises(FileExistsError):
        auth.make_keys(tmp_path, "ingest", [])
    with pytest.raises(ValueError, match="unknown role"):
        auth.make_keys(tmp_path, "other", ["admin"])
    assert not (tmp_path / "other.key").exists()


def test_allowed_keys_per_role_reloaded_when_the_folder_changes(tmp_path):
    public, _ = auth.make_keys(tmp_path, "reader", ["subscribe"])
    key = zmq.auth.load_certificate(public)[0]
    counters: Counter = Counter()
    allowed = auth.AllowedKeys(tmp_path / "allowed", counters)
    assert allowed.callback("subscribe", key)
    assert not allowed.callback("publish", key)
    assert not allowed.callback("pull", key)
    assert allowed.name(key) == "reader"
    # allowed to publish from now on: no restart
    (tmp_path / "allowed/publishers/reader.key").write_bytes(public.read_bytes())
    assert allowed.callback("publish", key)
    (tmp_path / "allowed/subscribers/reader.key").unlink()
    assert not allowed.callback("subscribe", key)
    assert counters["auth_ok.subscribe"] == 1 and counters["auth_refused.subscribe"] == 1
    assert counters["auth_refused.publish"] == 1 and counters["auth_ok.publish"] == 1
    stranger = zmq.curve_keypair()[0]
    assert not allowed.callback("subscribe", stranger)


def test_refusals_logged_once_per_key_and_role_with_bounded_memory(tmp_path, caplog):
    (tmp_path / "allowed" / "publishers").mkdir(parents=True)
    allowed = auth.AllowedKeys(tmp_path / "allowed", Counter())
    key = zmq.curve_keypair()[0]
    for _ in range(5):
        allowed.callback("publish", key)
    assert sum("refused key" in r.message for r in caplog.records) == 1
    for _ in range(auth.LOGGED_MAX + 10):
        allowed.callback("publish", zmq.curve_keypair()[0])
    assert len(allowed.logged) == auth.LOGGED_MAX


def curve_config(tmp_path, **bus) -> config.Config:
    cfg = config.load(env={"WATTFLOW_BUS_CURVE": "true",
                           "WATTFLOW_BUS_KEYS_DIR": str(tmp_path)})
    return dataclasses.replace(cfg, bus={**cfg.bus, **bus})


def test_secure_bind_and_connect_name_the_missing_key(tmp_path):
    cfg = curve_config(tmp_path)
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.SUB) as sock:
            with pytest.raises(auth.KeyProblem, match="bus.broker_public_key"):
                secure_connect(sock, cfg, "subscribe")
        auth.make_keys(tmp_path, "broker", [])
        with ctx.socket(zmq.SUB) as sock:
            with pytest.raises(auth.KeyProblem, match="bus.client_key_pair"):
                secure_connect(sock, cfg, "subscribe")
        with ctx.socket(zmq.SUB) as sock:  # a public key where the pair should be
            with pytest.raises(auth.KeyProblem, match="only a public key"):
                secure_connect(sock, dataclasses.replace(
                    cfg, bus={**cfg.bus, "client_key_pair": "broker.key"}), "subscribe")
        with ctx.socket(zmq.XSUB) as sock:
            secure_bind(sock, cfg, "publish")
            assert sock.curve_server and sock.zap_domain == b"publish"
        with ctx.socket(zmq.XSUB) as sock:
            with pytest.raises(ValueError, match="unknown role"):
                secure_connect(sock, cfg, "admin")
    finally:
        ctx.term()


def test_curve_off_leaves_sockets_plain(tmp_path):
    cfg = config.load(env={})
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.XSUB) as sock:
            secure_bind(sock, cfg, "publish")
            secure_connect(sock, cfg, "publish")
            assert sock.mechanism == zmq.NULL
    finally:
        ctx.term()
