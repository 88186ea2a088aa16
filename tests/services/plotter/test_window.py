import numpy as np

from services.plotter.main import Window, thin, total_power

S = 1_000_000


def cols(circuit: bytes, ts, watts):
    n = len(ts)
    return {"circuit": np.array([circuit] * n, dtype="S"), "ts_us": np.array(ts, dtype=np.int64),
            "watts": np.array(watts, dtype=float), "volts": np.ones(n), "amps": np.ones(n)}


def test_window_sorts_and_trims_to_window_s():
    w = Window(window_s=10)
    w.add(cols(b"a", [5 * S, 1 * S], [5.0, 1.0]))
    w.add(cols(b"b", [20 * S], [2.0]))
    series = w.series()
    assert series["a"][0].tolist() == []  # both older than 20 s - 10 s
    assert series["b"][0].tolist() == [20 * S]
    w.add(cols(b"a", [15 * S, 12 * S], [3.0, 4.0]))
    series = w.series()
    assert series["a"][0].tolist() == [12 * S, 15 * S] and series["a"][1].tolist() == [4.0, 3.0]


def test_total_power_sums_held_values():
    series = {"a": [np.array([0, 2 * S]), np.array([1.0, 3.0])],
              "b": [np.array([S]), np.array([10.0])]}
    grid, total = total_power(series, step_us=S)
    assert grid.tolist() == [0, S, 2 * S]
    assert total.tolist() == [1.0, 11.0, 13.0]


def test_thin_keeps_ends_and_limits_points():
    ts = np.arange(10_000)
    t, v = thin(ts, ts * 2, max_points=100)
    assert len(t) == 100 and t[0] == 0 and t[-1] == 9999 and (v == t * 2).all()
