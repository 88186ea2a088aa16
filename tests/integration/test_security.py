"""Strangers stay off the bus: a real stack with CURVE on (keys made by `wattflow keys`), and
clients with no key, an unknown key, the wrong broker key, or a key allowed only to subscribe.
They receive nothing and their forged `raw` and `ack` change nothing, while the same forgery
with an allowed key does get through (so the checks can fail). Also: the default config binds
the bus to loopback, keys that are missing stop a service with the key's name, and ingest's
source allow-list refuses, counts and logs once."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from shared import config, topics
from shared.bus import Publisher, Pusher, Subscriber
from shared.parsing import to_us
from tests.integration.stack import ROOT, Stack, free_port, wait_for


def make_keys(where: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "services", "keys", "--dir", str(where), *args],
                   check=True, capture_output=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def curve_overrides(tmp: Path) -> dict:
    make_keys(tmp / "keys")  # broker, client (publish, subscribe, pull), reader (subscribe)
    make_keys(tmp / "stranger", "stranger", "--allow", "publish", "subscribe")  # not the broker's
    pub, sub = free_port(), free_port()
    return {"bus": {"publish": f"tcp://127.0.0.1:{pub}", "subscribe": f"tcp://127.0.0.1:{sub}",
                    "curve": True, "keys_dir": str(tmp / "keys")},
            "broker": {"xsub_bind": f"tcp://127.0.0.1:{pub}",
                       "xpub_bind": f"tcp://127.0.0.1:{sub}"}}


@pytest.fixture
def curve_stack(tmp_path):
    s = Stack(tmp_path, curve_overrides(tmp_path))
    try:
        s.start()
        s.wait_ready()
        yield s
    finally:
        s.close()


def as_client(stack: Stack, **bus) -> config.Config | None:
    """The stack's config with other client keys (``curve=False``: a client with no key)."""
    if bus.get("curve") is False:
        return None
    return dataclasses.replace(stack.cfg, bus={**stack.cfg.bus, **bus})


def strangers(stack: Stack) -> dict[str, config.Config | None]:
    tmp = stack.tmp
    return {
        "no key": as_client(stack, curve=False),
        "unknown key": as_client(stack, client_key_pair=str(tmp / "stranger/stranger.key_secret")),
        # an allowed key pair, but talking to a broker key that is not the broker's
        "wrong broker key": as_client(stack, broker_public_key=str(tmp / "stranger/stranger.key")),
    }


def refusals(stack: Stack, role: str) -> int:
    c = stack.counters("broker")
    return c.get(f"handshakes_failed.{role}", 0) + c.get(f"auth_refused.{role}", 0)


def lines(year: int, n: int) -> bytes:
    return b"".join(b"10.0.0.1\t%d.01.01 00:00:%02d.0\t50\n" % (year, i) for i in range(n))


def readings_of(stack: Stack, year: int) -> int:
    lo, hi = to_us(year, 1, 1, 0, 0, 0, 0), to_us(year + 1, 1, 1, 0, 0, 0, 0)
    return stack.query("SELECT count(*) FROM readings WHERE ts_us >= ? AND ts_us < ?",
                       lo, hi)[0][0]


def FORGED_ACK(ingest_id: str) -> dict:  # noqa: N802 (a constant's shape)
    """An ack for the first thousand batches of an ingest stream."""
    return {"source": [ingest_id] * 1000, "seq": list(range(1000))}


def forged_raw(year: int) -> dict:
    data = lines(year, 5)
    return {"peer": ["forger:1"], "t_recv": np.array([0.0]), "data": [data], "base": 0}


def test_a_client_without_an_allowed_key_receives_nothing(curve_stack):
    stack = curve_stack
    everything = [b""]
    outsiders = {name: Subscriber(stack.ctx, stack.config["bus"]["subscribe"], everything,
                                  cfg=cfg) for name, cfg in strangers(stack).items()}
    stack.subs.extend(outsiders.values())
    reader_cfg = as_client(stack, client_key_pair="reader.key_secret")
    reader = Subscriber(stack.ctx, stack.config["bus"]["subscribe"], everything, cfg=reader_cfg)
    stack.subs.append(reader)
    # each stranger is turned away, again and again (it keeps reconnecting)
    before = refusals(stack, "subscribe")
    wait_for(lambda: refusals(stack, "subscribe") >= before + 2 * len(outsiders), 20,
             lambda: f"refusals counted by the broker: {stack.counters('broker')}")
    # meanwhile the allowed reader gets stats of every service and the readings of new lines
    stack.send(lines(2030, 10))
    got: dict[bytes, set] = {}

    def reader_saw_it_all() -> bool:
        for msg in reader.recv_batch(50, 1000):
            who = msg.data["service"] if msg.topic == topics.STATS else msg.src
            got.setdefault(msg.topic, set()).add(who)
        return (len(got.get(topics.STATS, ())) >= 5 and topics.READING in got
                and topics.RAW in got)

    wait_for(reader_saw_it_all, 20, lambda: f"the reader's topics {got}")
    for name, sub in outsiders.items():
        assert not sub.sock.poll(0), f"a client with {name} received a message"


def send_one_large_batch(stack: Stack, src: str) -> None:
    """A new connection to the work queue whose first batch is 2 MB; then it closes."""
    pusher = Pusher(stack.ctx, stack.config["bus"]["push"], src, cfg=stack.cfg)
    try:
        body = {"x": os.urandom(2 << 20)}
        wait_for(lambda: pusher.send_seq(topics.RAW, 0, body), 10, "room on the work queue")
    finally:
        pusher.sock.close(linger=2000)


def test_work_queue_survives_new_senders_whose_first_batch_is_large(tmp_path):
    """With CURVE, a new connection's ZAP user id waits ahead of its first message on the
    broker's PULL socket, which then polls readable before that message is whole; libzmq's
    proxy gave up on the empty read (EAGAIN) and the work queue forwarded nothing more while
    the broker kept reporting. Each new sender's first batch here is 2 MB (many reads)."""
    stack = Stack(tmp_path, curve_overrides(tmp_path))
    try:
        stack.start("broker")
        wait_for(lambda: "broker" in stack.stats(), 30, "the broker's stats")
        puller = Subscriber(stack.ctx, stack.config["bus"]["pull"], [], cfg=stack.cfg, pull=True)
        stack.subs.append(puller)
        for i in range(6):
            send_one_large_batch(stack, f"sender-{i}")
            wait_for(lambda: puller.sock.poll(100), 10,
                     lambda: "a new sender's batch through the work queue (broker's counters: "
                             f"{stack.counters('broker')})")
            puller.sock.recv_multipart()
        stack.check_alive()
    finally:
        stack.close()


def test_forged_raw_and_ack_from_strangers_change_nothing(curve_stack):
    stack = curve_stack
    ingest_id = stack.stats()["ingest"]["id"]
    # storage paused: ingest holds the honest lines unacked, so a forged ack would show
    os.kill(stack.procs["storage"].pid, signal.SIGSTOP)
    try:
        stack.send(lines(2030, 20))
        wait_for(lambda: stack.stats()["ingest"]["gauges"].get("unacked_lines") == 20, 20,
                 lambda: f"ingest holding 20 unacked lines: {stack.describe()}")
        forgers = strangers(stack)
        forgers["key allowed only to subscribe"] = as_client(
            stack, client_key_pair="reader.key_secret")
        for year, (name, cfg) in enumerate(forgers.items(), start=2031):
            forger = Publisher(stack.ctx, stack.config["bus"]["publish"], "forger", cfg=cfg)
            pusher = Pusher(stack.ctx, stack.config["bus"]["push"], "forger", cfg=cfg)
            try:
                before = refusals(stack, "publish")

                def attack(forger=forger, pusher=pusher, year=year, before=before) -> bool:
                    forger.send_seq(topics.ACK, 0, FORGED_ACK(ingest_id))
                    pusher.send_seq(topics.RAW, 0, forged_raw(year))  # into the work queue
                    return refusals(stack, "publish") >= before + 2

                wait_for(attack, 20, f"the broker refusing the forger with {name}")
            finally:
                forger.sock.close(linger=0)
                pusher.sock.close(linger=0)
        assert stack.counters("broker")["auth_refused.publish"] >= 2  # the reader's key, by ZAP
        ingest = stack.stats()["ingest"]
        assert ingest["gauges"]["unacked_lines"] == 20, ingest
        assert ingest["counters"].get("lines_acked", 0) == 0, ingest
        # the same forgery with an allowed key does get through: ingest drops what it holds
        allowed = Publisher(stack.ctx, stack.config["bus"]["publish"], "forger", cfg=stack.cfg)
        allowed_push = Pusher(stack.ctx, stack.config["bus"]["push"], "forger", cfg=stack.cfg)
        try:
            allowed_push.send_seq(topics.RAW, 0, forged_raw(2040))

            def attack_allowed() -> bool:
                allowed.send_seq(topics.ACK, 0, FORGED_ACK(ingest_id))
                return stack.stats()["ingest"]["gauges"].get("unacked_lines") == 0

            wait_for(attack_allowed, 20, "a forged ack with an allowed key reaching ingest")
        finally:
            allowed.sock.close(linger=1000)
            allowed_push.sock.close(linger=1000)
    finally:
        os.kill(stack.procs["storage"].pid, signal.SIGCONT)
    wait_for(lambda: readings_of(stack, 2040) == 5 and readings_of(stack, 2030) == 20, 30,
             lambda: f"honest and allowed lines stored: {stack.describe()}")
    for year in range(2031, 2031 + len(forgers)):
        assert readings_of(stack, year) == 0, f"lines forged with {list(forgers)[year - 2031]}"
    assert stack.count("readings") == 25


def test_tap_and_status_use_their_key(curve_stack, tmp_path):
    stack = curve_stack
    env = dict(stack.env, WATTFLOW_BUS_CLIENT_KEY_PAIR="reader.key_secret")
    out = subprocess.run(stack.wattflow("status", "--json"), env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ingest" in out.stdout and '"silent": []' in out.stdout
    tap = subprocess.run(stack.wattflow("tap", "stats", "--count", "1", "--timeout", "20"),
                         env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert tap.returncode == 0 and '"topic": "stats"' in tap.stdout, tap.stderr
    # with a key the broker does not know: nothing, and the client says why
    stranger = subprocess.run(
        stack.wattflow("tap", "stats", "--timeout", "5"), capture_output=True, text=True,
        timeout=60, cwd=tmp_path, env=dict(stack.env, WATTFLOW_BUS_CLIENT_KEY_PAIR=str(
            stack.tmp / "stranger" / "stranger.key_secret")))
    assert stranger.returncode == 0 and stranger.stdout == "", stranger.stdout
    assert "refused our key for subscribe" in stranger.stderr, stranger.stderr
    assert "stranger.key_secret into its allowed/subscribers/" in stranger.stderr
    # without a key: nothing (status says so and exits 1)
    plain = subprocess.run(stack.wattflow("status", "--wait", "2"), capture_output=True,
                           text=True, timeout=60, cwd=tmp_path,
                           env=dict(stack.env, WATTFLOW_BUS_CURVE="false"))
    assert plain.returncode == 1 and "no stats received" in plain.stdout


def test_missing_keys_stop_a_service_naming_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"bus: {{curve: true, keys_dir: {tmp_path / 'nowhere'}}}\n"
                    f"runtime: {{run_dir: {tmp_path / 'run'}}}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name, key in (("broker", "bus.allowed_keys_dir"), ("power", "bus.broker_public_key"),
                      ("tap", "bus.broker_public_key")):
        args = [name] if name != "tap" else ["tap", "stats", "--count", "1"]
        run = subprocess.run([sys.executable, "-m", "services", *args, "--config", str(path)],
                             env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert run.returncode == (2 if name == "tap" else 78), (name, run.stderr)
        assert key in run.stderr and "wattflow keys" in run.stderr, run.stderr


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            addr, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                raw = bytes.fromhex(addr)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6,
                                           words))
    return found


def test_the_default_broker_binds_loopback_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defaults = config.load(env={})
    assert defaults.broker["xsub_bind"].startswith("tcp://127.0.0.1:")
    assert defaults.broker["xpub_bind"].startswith("tcp://127.0.0.1:")
    # a broker started with the default host and free ports listens on 127.0.0.1 alone
    pub, sub = free_port(), free_port()
    stack = Stack(tmp_path, {
        "bus": {"publish": f"tcp://127.0.0.1:{pub}", "subscribe": f"tcp://127.0.0.1:{sub}"},
        "broker": {"xsub_bind": defaults.broker["xsub_bind"].rsplit(":", 1)[0] + f":{pub}",
                   "xpub_bind": defaults.broker["xpub_bind"].rsplit(":", 1)[0] + f":{sub}"}})
    try:
        stack.start("broker")
        wait_for(lambda: listening_addresses(pub) and listening_addresses(sub), 20,
                 "the broker listening")
        assert listening_addresses(pub) == listening_addresses(sub) == {"127.0.0.1"}
    finally:
        stack.close()


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_ingest_refuses_sources_outside_its_allow_list(make_stack):
    stack = make_stack(ingest={"allow": ["127.0.0.2/32", "10.0.0.0/8"]})
    stack.start()
    stack.wait_ready()
    for _ in range(3):  # from 127.0.0.1: closed at once, counted each time
        with connect_from("127.0.0.1", stack.port) as sock:
            try:
                sock.sendall(lines(2030, 3))
                assert sock.recv(1) == b""  # ingest closed it
            except ConnectionResetError:
                pass
    with connect_from("127.0.0.2", stack.port) as sock:
        sock.sendall(lines(2031, 4))
    wait_for(lambda: stack.count("readings") == 4, 20, lambda: stack.describe())
    wait_for(lambda: stack.counters("ingest").get("connections_refused_source") == 3, 10,
             lambda: f"ingest counting 3 refusals: {stack.counters('ingest')}")
    assert readings_of(stack, 2030) == 0 and readings_of(stack, 2031) == 4
    assert stack.counters("ingest")["lines_in"] == 4
    assert stack.log("ingest").count("refusing connections from 127.0.0.1") == 1


def test_curve_off_by_default_and_zmq_has_curve():
    assert zmq.has("curve")
    assert config.DEFAULTS["bus"]["curve"] is False


@contextlib.contextmanager
def second_namespace():
    """A network namespace joined to this one by a veth pair: 10.250.N.1 here, 10.250.N.2
    there (a test host of our own); removed afterwards. Skips where namespaces cannot be
    made (not root, no `ip`)."""
    n = os.getpid() % 250
    ns, here, there = f"wfsec{os.getpid()}", f"wfh{os.getpid()}", f"wfn{os.getpid()}"
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command")
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("cannot make a network namespace here")
    try:
        for cmd in (f"ip link add {here} type veth peer name {there}",
                    f"ip link set {there} netns {ns}",
                    f"ip addr add 10.250.{n}.1/30 dev {here}", f"ip link set {here} up",
                    f"ip netns exec {ns} ip addr add 10.250.{n}.2/30 dev {there}",
                    f"ip netns exec {ns} ip link set {there} up",
                    f"ip netns exec {ns} ip link set lo up"):
            subprocess.run(cmd.split(), check=True, capture_output=True)
        yield ns, f"10.250.{n}.1"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def reach_from(ns: str, host: str, port: int) -> str:
    code = ("import socket, sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout=3).close(); print('open')\n"
            "except OSError as exc:\n"
            "    print(type(exc).__name__)\n")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr.strip()


def test_from_another_network_namespace_the_default_bus_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defaults = config.load(env={})
    with second_namespace() as (ns, host_address):
        pub, sub = free_port(), free_port()
        stack = Stack(tmp_path, {
            "bus": {"publish": f"tcp://127.0.0.1:{pub}", "subscribe": f"tcp://127.0.0.1:{sub}"},
            "broker": {"xsub_bind": defaults.broker["xsub_bind"].rsplit(":", 1)[0] + f":{pub}",
                       "xpub_bind": defaults.broker["xpub_bind"].rsplit(":", 1)[0] + f":{sub}"},
            # the control: a port bound where the other namespace can reach it
            "ingest": {"host": host_address}})
        try:
            stack.start()
            stack.wait_ready()
            assert reach_from(ns, host_address, stack.port) == "open"
            assert reach_from(ns, host_address, pub) == "ConnectionRefusedError"
            assert reach_from(ns, host_address, sub) == "ConnectionRefusedError"
        finally:
            stack.close()
