"""Power from the latest voltage and current readings of each circuit (pure logic, no I/O).

Each meter's latest reading is kept by *measurement* time: a reading older than (or as old as)
the one held never replaces it and triggers nothing. A newer reading of a circuit's meter
yields power when the circuit's other meter holds a reading at most ``max_time_diff`` apart.
The power point carries the later of the two timestamps.
"""

from __future__ import annotations

import numpy as np

from shared.config import Circuit

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
        self.stale = 0  # readings older than the one held

    def feed(self, meters: list[str], ts_us: list[int], values: list[float],
             t_recv: list[float]) -> dict[str, list]:
        """Readings in arrival order -> power columns (possibly empty)."""
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
