"""Power from the latest voltage and current readings of each circuit (pure logic, no I/O).

Each meter's latest reading is kept by *measurement* time: a reading older than (or as old as)
the one held never replaces it and triggers nothing. A newer reading of a circuit's meter
yields power when the circuit's other meter holds a reading at most ``max_time_diff`` apart.
The power point carries the later of the two timestamps.
"""

from __future__ import annotations

import numpy as np

from shared.config import Circuit

SMALL_BATCH = 200  # below this many readings, one by one is cheaper than per-meter columns
POWER_COLUMNS = ("circuit", "ts_us", "watts", "volts", "amps", "v_meter", "a_meter", "t_recv")


class Pairing:
    def __init__(self, circuits: tuple[Circuit, ...] | list[Circuit], max_time_diff_s: float):
        self.max_diff_us = round(max_time_diff_s * 1_000_000)
        self.circuits = tuple(circuits)
        # meter id -> list of (circuit index, is_voltage)
        self.roles: dict[str, list[tuple[int, bool]]] = {}
        for i, c in enumerate(self.circuits):
            self.roles.setdefault(c.voltage, []).append((i, True))
            self.roles.setdefault(c.current, []).append((i, False))
        self.latest: dict[str, tuple[int, float]] = {}  # meter -> (ts_us, value)
        self.c_name = _bytes_column([c.name for c in self.circuits])
        self.c_voltage = _bytes_column([c.voltage for c in self.circuits])
        self.c_current = _bytes_column([c.current for c in self.circuits])
        self.stale = 0  # readings older than the one held

    def feed(self, meters: list[str], ts_us: list[int], values: list[float],
             t_recv: list[float]) -> dict[str, list]:
        """Readings in arrival order -> power columns as lists (possibly empty)."""
        cols = self.feed_columns(
            np.array([m.encode() for m in meters], dtype="S") if meters else _EMPTY_S,
            np.array(ts_us, dtype=np.int64), np.array(values, dtype=np.float64),
            np.array(t_recv, dtype=np.float64))
        return {k: [b.decode() for b in v.tolist()] if v.dtype.kind == "S" else v.tolist()
                for k, v in cols.items()}

    def feed_columns(self, meter: np.ndarray, ts_us: np.ndarray, value: np.ndarray,
                     t_recv: np.ndarray) -> dict[str, np.ndarray]:
        """Readings in arrival order (columns, meter ids as bytes) -> power columns for the bus.

        The same result as taking the readings one by one, computed per meter instead: a
        reading is fresh when it is newer than everything its meter had before it (the held
        reading and the batch's earlier ones: a running maximum); the partner a fresh reading
        pairs with is the partner's last fresh reading before it in the batch, else the one
        held when the batch began. Points come out in reading order, then circuit order."""
        if not len(meter):
            return _empty_columns()
        if len(meter) < SMALL_BATCH:
            return to_columns(self._feed_loop([m.decode() for m in meter.tolist()],
                                              ts_us.tolist(), value.tolist(), t_recv.tolist()))
        names, inverse = _group(meter)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
        fresh: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        before: dict[str, tuple[int, float] | None] = {}
        for j, name in enumerate(b.decode() for b in names.tolist()):
            pos = order[bounds[j] : bounds[j + 1]]  # this meter's readings, in arrival order
            t = ts_us[pos]
            held = self.latest.get(name)
            floor = held[0] if held is not None else _MIN_TS
            newest_before = np.maximum.accumulate(np.concatenate(([floor], t)))[:-1]
            keep = t > newest_before
            self.stale += int(len(t) - np.count_nonzero(keep))
            pos, t = pos[keep], t[keep]
            before[name] = held
            fresh[name] = (pos, t, value[pos])
            if len(pos):
                self.latest[name] = (int(t[-1]), float(value[pos[-1]]))
        parts = []
        for name, (pos, t, val) in fresh.items():
            if not len(pos):
                continue
            for rank, (ci, is_voltage) in enumerate(self.roles.get(name, ())):
                c = self.circuits[ci]
                partner = c.current if is_voltage else c.voltage
                held = before[partner] if partner in before else self.latest.get(partner)
                p_pos, p_t, p_val = fresh.get(partner, _NO_FRESH)
                k = np.searchsorted(p_pos, pos) - 1  # partner's last fresh reading before
                in_batch = k >= 0
                ks = np.maximum(k, 0)
                if len(p_pos):
                    o_t = np.where(in_batch, p_t[ks], held[0] if held else 0)
                    o_v = np.where(in_batch, p_val[ks], held[1] if held else 0.0)
                else:
                    o_t = np.full(len(pos), held[0] if held else 0, np.int64)
                    o_v = np.full(len(pos), held[1] if held else 0.0)
                have = in_batch if held is None else np.ones(len(pos), bool)
                hit = np.flatnonzero(have & (np.abs(t - o_t) <= self.max_diff_us))
                if not len(hit):
                    continue
                volts, amps = (val[hit], o_v[hit]) if is_voltage else (o_v[hit], val[hit])
                parts.append((pos[hit], np.full(len(hit), rank), np.full(len(hit), ci),
                              np.maximum(t[hit], o_t[hit]), volts, amps))
        if not parts:
            return _empty_columns()
        pos, rank, ci, ts, volts, amps = (np.concatenate(col) for col in zip(*parts, strict=True))
        out_order = np.lexsort((rank, pos))
        pos, ci, volts, amps = pos[out_order], ci[out_order], volts[out_order], amps[out_order]
        return {
            "circuit": self.c_name[ci],
            "ts_us": ts[out_order].astype(np.int64),
            "watts": volts * amps,
            "volts": volts.astype(np.float64),
            "amps": amps.astype(np.float64),
            "v_meter": self.c_voltage[ci],
            "a_meter": self.c_current[ci],
            "t_recv": t_recv[pos].astype(np.float64),
        }

    def _feed_loop(self, meters: list[str], ts_us: list[int], values: list[float],
             t_recv: list[float]) -> dict[str, list]:
        """One reading at a time (cheaper than the column path for small batches)."""
        out: dict[str, list] = {k: [] for k in POWER_COLUMNS}
        roles, latest, circuits, max_diff = self.roles, self.latest, self.circuits, self.max_diff_us
        for meter, ts, value, recv in zip(meters, ts_us, values, t_recv, strict=True):
            held = latest.get(meter)
            if held is not None and ts <= held[0]:
                self.stale += 1
                continue
            latest[meter] = (ts, value)
            for ci, is_voltage in roles.get(meter, ()):
                c = circuits[ci]
                other = latest.get(c.current if is_voltage else c.voltage)
                if other is None or abs(ts - other[0]) > max_diff:
                    continue
                volts, amps = (value, other[1]) if is_voltage else (other[1], value)
                out["circuit"].append(c.name)
                out["ts_us"].append(max(ts, other[0]))
                out["watts"].append(volts * amps)
                out["volts"].append(volts)
                out["amps"].append(amps)
                out["v_meter"].append(c.voltage)
                out["a_meter"].append(c.current)
                out["t_recv"].append(recv)
        return out


def _group(meter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids of a bytes column and each row's group: ``np.unique`` on a 64-bit hash of
    the ids (a sort of integers, several times cheaper than sorting strings), checked exactly
    against the ids themselves."""
    width = meter.dtype.itemsize
    if width > 8 * len(_HASH_MULT):
        names, inverse = np.unique(meter, return_inverse=True)
        return names, inverse.ravel()
    words = np.zeros((len(meter), -(-width // 8) * 8), np.uint8)
    words[:, :width] = meter.view(np.uint8).reshape(len(meter), width)
    words = words.view(np.uint64)
    with np.errstate(over="ignore"):
        h = (words * _HASH_MULT[: words.shape[1]]).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    names = meter[first]
    inverse = inverse.ravel()
    if not (names[inverse] == meter).all():  # a hash collision: group by the ids themselves
        names, inverse = np.unique(meter, return_inverse=True)
        inverse = inverse.ravel()
    return names, inverse


_HASH_MULT = (np.arange(1, 65, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def _empty_columns() -> dict[str, np.ndarray]:
    return to_columns({k: [] for k in POWER_COLUMNS})


_EMPTY_S = np.empty(0, "S1")
_MIN_TS = np.iinfo(np.int64).min
_NO_FRESH = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))


def to_columns(out: dict[str, list]) -> dict[str, np.ndarray]:
    """Power lists -> typed columns for the bus."""
    return {
        "circuit": np.array(out["circuit"], dtype="S"),
        "ts_us": np.array(out["ts_us"], dtype=np.int64),
        "watts": np.array(out["watts"], dtype=np.float64),
        "volts": np.array(out["volts"], dtype=np.float64),
        "amps": np.array(out["amps"], dtype=np.float64),
        "v_meter": np.array(out["v_meter"], dtype="S"),
        "a_meter": np.array(out["a_meter"], dtype="S"),
        "t_recv": np.array(out["t_recv"], dtype=np.float64),
    }


def _bytes_column(texts: list[str]) -> np.ndarray:
    return np.array([t.encode() for t in texts], dtype="S") if texts else _EMPTY_S
