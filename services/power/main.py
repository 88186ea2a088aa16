"""power: readings in, power points out: an as-of join per circuit (asof.py), the same points
whatever the order readings arrive in, kept exact through restarts and split over replicas.

* Each circuit is computed by one live power replica: the replicas see each other on ``stats``
  and give every circuit to the one with the highest hash of (circuit, replica id)
  (rendezvous hashing), so when one joins, leaves or dies only its circuits move.
* A circuit a replica takes (at start, or from another) is first caught up from storage: its
  points after the circuit's checkpoint (``progress``: stored points up to it are final) are
  recomputed from the stored readings, a chunk at a time; then its meters' recent readings seed
  the in-memory stream. Readings of it that arrive meanwhile are answered from storage too.
* Readings arriving within ``power.lateness_s`` of their meters' newest are computed in memory,
  correcting the points they change; older ones are answered from storage (Late work).
* Points go to storage in numbered batches on the work queue (an Outbox: kept until acked,
  sent again when not), each with the circuits' checkpoints; storage upserts them by (circuit,
  time), so a point computed twice (a replica taking over, a resend) is stored once. They are
  also published on ``power`` for the plotter, the dashboard and ``wattflow tap``.
* A gap in the readings received (the broker dropped messages for a power that fell behind)
  makes the replica catch its circuits up from storage again.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time

import numpy as np

from services.power.asof import I8_MAX, I8_MIN, Late, Stream, points_in_range
from shared import topics
from shared.config import Circuit, Config
from shared.db import NotReady, open_database, storage_url
from shared.outbox import Outbox
from shared.service import Runtime

log = logging.getLogger("power")
CATCHUP_CHUNK_US = 60_000_000  # readings of a circuit read from storage per catch-up step
PEER_SILENT_S = 3.0  # a power replica not heard this long (in stats intervals) is gone
RECENT_S = 5.0  # readings kept in hand for Late answers (storage commits well within this)
MAX_UNACKED_BATCHES = 200  # power batches sent and not acked, at most; then power waits
PENDING_BATCHES = 1000  # readings batches kept per meter waiting for its seeding, at most
GAP_RESYNC_DELAY_S = 2.0  # after a gap: let storage commit what was published, then catch up


class Catchup:
    """A circuit being recomputed from storage, from ``position`` on."""

    def __init__(self, circuit: Circuit, position: int):
        self.circuit = circuit
        self.position = position


class Recent:
    """The readings received in the last few seconds, per meter. Storage publishes readings
    before it commits them, so a Late answer joins these to what storage returns: a reading
    too old for memory that a later batch's Late work needs is here while it may not be
    stored yet."""

    def __init__(self, keep_s: float):
        self.keep_s = keep_s
        self.parts: collections.deque = collections.deque()  # (received, meter col, ts, value)

    def add(self, d) -> None:
        now = time.monotonic()
        self.parts.append((now, d["meter"], d["ts_us"], d["value"]))
        while self.parts and now - self.parts[0][0] > self.keep_s:
            self.parts.popleft()

    def between(self, meter: str, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        name = meter.encode()
        ts, val = [], []
        for _, m, t, v in self.parts:
            sel = (m == name) & (t >= t0) & (t <= t1)
            if sel.any():
                ts.append(t[sel])
                val.append(v[sel])
        return (np.concatenate(ts) if ts else np.empty(0, np.int64),
                np.concatenate(val) if val else np.empty(0, np.float64))


class Power:
    def __init__(self, rt: Runtime):
        self.rt = rt
        cfg = rt.cfg.power
        self.D = round(cfg["max_time_diff"] * 1_000_000)
        self.circuits = {c.name: c for c in rt.cfg.circuits}
        self.stream = Stream([], self.D, round(cfg["lateness_s"] * 1_000_000),
                             cfg["max_readings_per_meter"])
        self.sub = rt.subscriber([topics.READING, topics.STATS])
        self.acks = rt.subscriber([topics.ACK])
        self.pub = rt.publisher()
        self.work = rt.pusher()
        self.outbox = Outbox(lambda seq, data: self.work.send_seq(topics.POWER, seq, data),
                             rt.cfg.ingest["ack_timeout_s"], rt.counters)
        self.outbox_min: dict[int, dict[str, int]] = {}  # seq -> circuit -> earliest point
        self.db = None
        self.peers: dict[str, float] = {}  # other power replicas -> when last heard
        self.owned: set[str] = set()
        self.catchups: dict[str, Catchup] = {}
        self.started = time.monotonic()
        self.settle_s = 2.5 * rt.cfg.runtime["stats_interval_s"]  # hear the others first
        self.resync_at: float | None = None
        self.pending: dict[str, list] = {}  # meter -> readings received before its seeding
        self.recent = Recent(RECENT_S)
        self.gaps_seen = 0

    # ---- the database ----------------------------------------------------------------------

    def database(self):
        """Storage's database, for reading (None until storage has made it)."""
        if self.db is None:
            try:
                self.db = open_database(storage_url(self.rt.cfg.storage), writer=False)
            except NotReady as exc:
                self.rt.gauges["waiting_for_database"] = str(exc)
                return None
            self.rt.gauges.pop("waiting_for_database", None)
        return self.db

    # ---- who computes what -----------------------------------------------------------------

    def heard(self, msg) -> None:
        data = msg.data if isinstance(msg.data, dict) else {}
        if data.get("service") == "power" and msg.src != self.rt.src:
            quiet = PEER_SILENT_S * self.rt.cfg.runtime["stats_interval_s"]
            if data.get("stopped"):
                self.peers.pop(msg.src, None)
            elif data.get("busy_s", 0) < quiet:  # (one busy that long counts as gone: a hung
                self.peers[msg.src] = time.monotonic()  # replica's circuits move on)

    def rebalance(self) -> None:
        """Take the circuits rendezvous hashing gives this replica among the live ones; a
        circuit taken is caught up from storage, one given away is forgotten."""
        if time.monotonic() - self.started < self.settle_s:
            return
        quiet = PEER_SILENT_S * self.rt.cfg.runtime["stats_interval_s"]
        now = time.monotonic()
        self.peers = {p: t for p, t in self.peers.items() if now - t < quiet}
        members = [self.rt.src, *self.peers]
        mine = {name for name in self.circuits if max(members, key=lambda m: _rank(name, m))
                == self.rt.src}
        if mine == self.owned:
            return
        taken, given = mine - self.owned, self.owned - mine
        if taken or given:
            log.info("circuits: %d here of %d, %d power replicas (took %s, gave %s)", len(mine),
                     len(self.circuits), len(members), sorted(taken) or "-",
                     sorted(given) or "-")
        self.owned = mine
        for name in given:
            self.catchups.pop(name, None)
        self.stream.set_circuits([self.circuits[n] for n in sorted(mine)])
        self.start_catchup(taken)
        self.rt.gauges["circuits"] = sorted(mine)

    def start_catchup(self, names) -> None:
        db = self.database()
        progress = db.progress() if db is not None else {}
        newest_power = {}
        for name in names:
            c = self.circuits[name]
            if name in progress:
                since = progress[name] + 1
            else:  # no checkpoint yet: from its last stored point (an older power's), if any
                if db is not None and not newest_power:
                    newest_power = db.newest_power(sorted(names))
                since = newest_power.get(name, -(2**62))
            self.catchups[name] = Catchup(c, since)

    def catchup_step(self) -> None:
        """One chunk of one circuit's catch-up: its points in the next stretch of stored
        readings; at the end, its meters' recent readings seed the stream."""
        if not self.catchups:
            return
        db = self.database()
        if db is None:
            return
        name = next(iter(self.catchups))
        job = self.catchups[name]
        c = job.circuit
        newest = db.newest([c.voltage, c.current])
        if len(newest) < 2:  # a meter with no reading yet: nothing to catch up
            self._seed(job, newest)
            return
        end = max(newest.values())
        # skip time with no readings: points exist only at readings' times
        first = db.oldest([c.voltage, c.current], after=job.position - 1)
        if first and min(first.values()) > job.position:
            job.position = min(first.values())
        if job.position <= end:
            t1 = min(job.position + CATCHUP_CHUNK_US, end)
            self._compute(c, job.position, t1, db)
            self.rt.counters["catchup_chunks"] += 1
            job.position = t1 + 1
        if job.position > end:
            self._seed(job, newest)

    def _seed(self, job: Catchup, newest: dict[str, int]) -> None:
        """The circuit is caught up: its meters' memory starts at the recent stored readings."""
        del self.catchups[job.circuit.name]
        db = self.database()
        c = job.circuit
        window = self.stream.lateness + self.D
        for m in (c.voltage, c.current):
            if self.stream.coverage_start(m) != I8_MAX:  # already in memory (shared meter)
                continue
            top = newest.get(m, job.position)
            start = max(top - window - self.D, I8_MIN + 1)
            cols = db.readings([m], start, top)
            held = self.pending.pop(m, [])
            ts = np.concatenate([cols["ts_us"], *(t for t, _ in held)])
            values = np.concatenate([cols["value"], *(v for _, v in held)])
            self.stream.load(m, ts, values, start)
        log.info("circuit %s caught up from storage", c.name)

    def _compute(self, c: Circuit, t0: int, t1: int, db, hand=None) -> None:
        """Points of ``c`` in [t0, t1] from stored readings (plus ``hand``: a Late's)."""
        v = db.readings([c.voltage], t0 - self.D, t1)
        a = db.readings([c.current], t0 - self.D, t1)
        if hand is None:
            p = points_in_range(v["ts_us"], v["value"], a["ts_us"], a["value"], t0, t1, self.D)
            n = len(p["ts_us"])
            p = {"circuit": _col(c.name, n), **p, "v_meter": _col(c.voltage, n),
                 "a_meter": _col(c.current, n)}
        else:
            p = hand.answer(v["ts_us"], v["value"], a["ts_us"], a["value"])
        self.emit(p, recv=None)

    # ---- the stream ------------------------------------------------------------------------

    def feed(self, msg) -> None:
        d = msg.data
        self.recent.add(d)
        self.hold_for_seed(d)
        points, late = self.stream.feed(d["meter"], d["ts_us"], d["value"])
        self.rt.counters["readings_in"] += len(d["ts_us"])
        if len(points["ts_us"]):
            self.emit(points, recv=d)
        self.answer(late)

    def hold_for_seed(self, d) -> None:
        """Readings of meters whose memory is not seeded yet (a catch-up runs): kept, and
        merged into the memory with the stored readings when it is seeded (they may not be
        stored yet then)."""
        if not self.catchups:
            return
        for name in np.unique(d["meter"]).tolist():
            m = name.decode()
            try:
                unseeded = self.stream.coverage_start(m) == I8_MAX
            except KeyError:
                continue
            if unseeded:
                sel = d["meter"] == name
                held = self.pending.setdefault(m, [])
                held.append((d["ts_us"][sel], d["value"][sel]))
                if len(held) > PENDING_BATCHES:
                    del held[0]

    def answer(self, late: list[Late]) -> None:
        """Late work: from storage, now (before the next batch: an answer must not overwrite
        a newer point)."""
        if not late:
            return
        db = self.database()
        for job in late:
            if job.circuit not in self.owned:
                continue
            self.rt.counters["late_answered"] += 1
            cols = []
            for m in (job.v_meter, job.a_meter):  # stored, and recent (maybe not stored yet)
                ts, val = self.recent.between(m, job.since, job.t1)
                if db is not None:
                    stored = db.readings([m], job.since, job.t1)
                    ts = np.concatenate((stored["ts_us"], ts))
                    val = np.concatenate((stored["value"], val))
                cols += [ts, val]
            self.emit(job.answer(*cols), recv=None)

    def emit(self, points: dict, recv) -> None:
        """Points computed: to storage (numbered, with checkpoints) and on the bus."""
        n = len(points["ts_us"])
        if not n:
            return
        keep = np.isin(points["circuit"], np.array(sorted(self.owned), dtype="S")) \
            if self.owned else np.zeros(n, bool)
        if not keep.all():
            points = {k: v[keep] for k, v in points.items()}
            n = len(points["ts_us"])
            if not n:
                return
        earliest = {}
        for name in np.unique(points["circuit"]).tolist():
            earliest[name.decode()] = int(points["ts_us"][points["circuit"] == name].min())
        t_recv = _receive_times(points["ts_us"], recv)
        cols = dict(points, t_recv=t_recv)
        data = dict(cols, progress=self.checkpoints(earliest))
        seq = self.outbox.add(data, n, 0)
        self.outbox_min[seq] = earliest
        self.outbox.pump()
        self.pub.send(topics.POWER, cols)
        self.rt.counters["power_published"] += n

    def checkpoints(self, earliest: dict[str, int]) -> dict[str, int]:
        """Per owned circuit: stored points up to this time are final once this batch is in:
        the stream's final_through, but below every point still unacked or being caught up."""
        unacked: dict[str, int] = dict(earliest)
        for seq in self.outbox.entries:
            for name, t in self.outbox_min.get(seq, {}).items():
                unacked[name] = min(unacked.get(name, t), t)
        out = {}
        for name in self.owned:
            if name in self.catchups:
                through = self.catchups[name].position - 1
            else:
                through = self.stream.final_through(name)
            if name in unacked:
                through = min(through, unacked[name] - 1)
            # always said, even "nothing final yet": a circuit with a checkpoint was computed
            # by this power (one without is an older version's, resumed after its last point)
            out[name] = int(max(through, I8_MIN + 1))
        return out

    def poll_acks(self) -> None:
        for msg in self.acks.recv_batch(0, 1000):
            seqs = [seq for source, seq in zip(msg.data["source"], msg.data["seq"], strict=True)
                    if source == self.rt.src]
            self.outbox.ack(seqs)
            for seq in seqs:
                self.outbox_min.pop(seq, None)

    def step(self, timeout_ms: int) -> int:
        if len(self.outbox.entries) > MAX_UNACKED_BATCHES:  # storage is behind: wait for it
            self.rt.counters["paused_for_storage"] += 1  # (readings left on the bus, or lost
            msgs = []  # there as a gap, which a catch-up from storage answers later)
            time.sleep(timeout_ms / 1000)
        else:
            msgs = self.sub.recv_batch(timeout_ms, 100)
        for msg in msgs:
            if msg.topic == topics.STATS:
                self.heard(msg)
            elif self.owned:
                self.feed(msg)
        if self.sub.gaps > self.gaps_seen:  # readings lost on the way: catch up again
            self.gaps_seen = self.sub.gaps
            self.resync_at = time.monotonic() + GAP_RESYNC_DELAY_S
        if self.resync_at is not None and time.monotonic() >= self.resync_at:
            self.resync_at = None
            log.warning("readings were lost on the way (a gap): catching up from storage")
            owned = [self.circuits[n] for n in sorted(self.owned)]
            self.stream.set_circuits([])  # memory may lack what was lost: start it afresh
            self.stream.set_circuits(owned)
            self.pending.clear()
            self.start_catchup(sorted(self.owned))
        self.rebalance()
        self.catchup_step()
        self.poll_acks()
        self.outbox.resend_overdue()
        self.outbox.pump()
        self.rt.gauges.update(held_readings=self.stream.held, memory_bytes=self.stream.memory_bytes,
                              catching_up=sorted(self.catchups), unacked_batches=len(
                                  self.outbox.entries), peers=len(self.peers))
        return len(msgs)


def _rank(circuit: str, member: str) -> int:
    """Rendezvous hashing: the member with the highest rank computes the circuit."""
    return int.from_bytes(hashlib.blake2b(f"{circuit}\0{member}".encode(), digest_size=8)
                          .digest(), "big")


def _receive_times(ts: np.ndarray, recv) -> np.ndarray:
    """When ingest received the reading each point is stamped with (the batch's reading at
    that time; else, for a point a reading changed at a later partner time, the batch's
    newest receive time; points answered from storage: now)."""
    if recv is None or not len(recv.get("t_recv", ())):
        return np.full(len(ts), time.time())
    r_ts, r_recv = np.asarray(recv["ts_us"]), np.asarray(recv["t_recv"], np.float64)
    order = np.argsort(r_ts, kind="stable")
    r_ts, r_recv = r_ts[order], r_recv[order]
    i = np.minimum(np.searchsorted(r_ts, ts), len(r_ts) - 1)
    return np.where(r_ts[i] == ts, r_recv[i], r_recv.max())


def _col(text: str, n: int) -> np.ndarray:
    return np.array([text.encode()] * n, dtype="S") if n else np.empty(0, "S1")



def run(cfg: Config) -> int:
    rt = Runtime("power", cfg)
    rt.install_signals()
    if not cfg.circuits:
        log.warning("no circuits configured: power will publish nothing (see config 'circuits')")
    power = Power(rt)
    log.info("power up: %d circuits, max_time_diff %ss, lateness %ss", len(cfg.circuits),
             cfg.power["max_time_diff"], cfg.power["lateness_s"])
    try:
        while not rt.stopping.is_set():
            power.step(50)
            rt.tick()
        end = time.monotonic() + 5  # what is on its way, and acks for what was sent
        while time.monotonic() < end and (power.step(100) or power.outbox.entries):
            rt.tick()  # (stopping in order, not busy)
    finally:
        rt.close()
    log.info("power stopped: %d points published", rt.counters["power_published"])
    return 0
