from __future__ import annotations

import pytest

from shared import config
from shared.config import Circuit, ConfigError, Meter


def load_yaml(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return config.load(path, env=env or {})


def test_defaults_are_the_original_five_meters_and_four_circuits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./config.yaml here
    cfg = config.load(env={})
    assert cfg.source == "built-in defaults"
    assert cfg.meters == (
        Meter("10.0.0.1", "V", 0, 110), Meter("10.0.0.2", "A", 0, 0.5),
        Meter("10.0.0.3", "A", 0.2, 1), Meter("10.0.0.4", "A", 1, 5),
        Meter("10.0.0.5", "A", 3, 10),
    )
    assert cfg.circuits == tuple(Circuit(ip, "10.0.0.1", ip)
                                 for ip in ("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"))
    assert cfg.ingest["port"] == 44444 and cfg.power["max_time_diff"] == 0.5


def test_shipped_example_config_loads_with_the_defaults(tmp_path, monkeypatch):
    from pathlib import Path

    example = config.load(Path(__file__).parents[2] / "config.yaml", env={})
    monkeypatch.chdir(tmp_path)
    defaults = config.load(env={})
    assert example.meters == defaults.meters and example.circuits == defaults.circuits
    for section in ("bus", "broker", "ingest", "storage", "power", "plotter", "runtime"):
        assert getattr(example, section) == getattr(defaults, section), section


def test_yaml_file_and_env_overrides(tmp_path):
    cfg = load_yaml(tmp_path, "ingest:\n  port: 5000\nstorage:\n  path: /x/y.db\n",
                    env={"WATTFLOW_INGEST_PORT": "6000", "WATTFLOW_PLOTTER_DIR": "/p"})
    assert cfg.ingest["port"] == 6000  # the environment wins
    assert cfg.storage["path"] == "/x/y.db"
    assert cfg.plotter["dir"] == "/p"
    assert cfg.ingest["max_line"] == 1024  # untouched default


def test_explicit_circuits(tmp_path):
    cfg = load_yaml(tmp_path, """
meters:
  - {ip: v1, unit: V, range: [0, 250]}
  - {ip: v2, unit: V, range: [0, 250]}
  - {ip: a1, unit: A, range_start: 0, range_stop: 16}
circuits:
  - {name: pump, voltage: v1, current: a1}
  - {name: fan, voltage: v2, current: a1}
""")
    assert cfg.circuits == (Circuit("pump", "v1", "a1"), Circuit("fan", "v2", "a1"))


def test_two_voltage_meters_without_circuits_gives_none(tmp_path):
    cfg = load_yaml(tmp_path, "meters:\n  - {ip: a, unit: V, range: [0, 1]}\n"
                              "  - {ip: b, unit: V, range: [0, 1]}\n")
    assert cfg.circuits == ()


@pytest.mark.parametrize("text, key", [
    ("ingset:\n  port: 1\n", "ingset"),
    ("ingest:\n  prot: 1\n", "ingest.prot"),
    ("ingest:\n  port: seventy\n", "ingest.port"),
    ("ingest:\n  port: 70000\n", "ingest.port"),
    ("ingest: 5\n", "ingest"),
    ("power:\n  max_time_diff: -1\n", "power.max_time_diff"),
    ("runtime:\n  log_level: LOUD\n", "runtime.log_level"),
    ("meters: []\n", "meters"),
    ("meters:\n  - {ip: a, unit: W, range: [0, 1]}\n", "meters[0].unit"),
    ("meters:\n  - {ip: a, unit: V, range: [2, 1]}\n", "meters[0]"),
    ("meters:\n  - {ip: a, unit: V, range: [0, x]}\n", "meters[0].range_stop"),
    ("meters:\n  - {ip: a, unit: V, range: [0, .nan]}\n", "meters[0].range_stop"),
    ("meters:\n  - {ip: a, unit: V, range: [0]}\n", "meters[0].range"),
    ("meters:\n  - {ip: 'a b', unit: V, range: [0, 1]}\n", "meters[0].ip"),
    ("meters:\n  - {ip: a, unit: V, range: [0, 1]}\n  - {ip: a, unit: A, range: [0, 1]}\n",
     "listed twice"),
    ("circuits:\n  - {name: c, voltage: 10.0.0.9, current: 10.0.0.2}\n", "circuits[0].voltage"),
    ("circuits:\n  - {name: c, voltage: 10.0.0.2, current: 10.0.0.3}\n", "circuits[0].voltage"),
    ("circuits:\n  - {name: c, voltage: 10.0.0.1, current: 10.0.0.1}\n", "circuits[0].current"),
    ("[1, 2]\n", "top level"),
    ("ingest: {port: [1\n", "cannot be read"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_yaml(tmp_path, text)
    assert key in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml", env={})


def test_env_override_with_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="ingest.port"):
        config.load(env={"WATTFLOW_INGEST_PORT": "x"})


def test_original_meter_file_with_cyrillic_units(tmp_path):
    (tmp_path / "meters.tsv").write_text(
        "# ip\tstart\tstop\tunit\n10.0.0.1\t0\t110\tВ\n10.0.0.2\t0\t0.5\tА\n10.0.0.3\t0.2\t1\tA\n",
        encoding="utf-8")
    cfg = load_yaml(tmp_path, "meters_file: meters.tsv\n")  # relative to the config file
    assert cfg.meters == (Meter("10.0.0.1", "V", 0, 110), Meter("10.0.0.2", "A", 0, 0.5),
                          Meter("10.0.0.3", "A", 0.2, 1))
    assert [c.current for c in cfg.circuits] == ["10.0.0.2", "10.0.0.3"]


def test_bad_meter_file_line_names_file_and_line(tmp_path):
    (tmp_path / "m.tsv").write_text("10.0.0.1\t0\t110\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"m.tsv:1"):
        load_yaml(tmp_path, "meters_file: m.tsv\n")


def test_security_keys_defaults_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(env={})
    assert cfg.broker["xsub_bind"] == "tcp://127.0.0.1:5550"
    assert cfg.broker["xpub_bind"] == "tcp://127.0.0.1:5551"
    assert cfg.bus["curve"] is False and cfg.ingest["allow"] == []
    cfg = config.load(env={"WATTFLOW_BUS_CURVE": "true",
                           "WATTFLOW_INGEST_ALLOW": "[10.0.0.0/8, 192.168.1.7, 'fd00::/8']"})
    assert cfg.bus["curve"] is True
    assert cfg.ingest["allow"] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
    with pytest.raises(ConfigError, match=r"bus.curve: expected true or false, got 'yes please'"):
        config.load(env={"WATTFLOW_BUS_CURVE": "yes please"})
    with pytest.raises(ConfigError, match=r"ingest.allow\[1\]: expected a network"):
        load_yaml(tmp_path, "ingest:\n  allow: [10.0.0.0/8, 10.0.0.300]\n")
    with pytest.raises(ConfigError, match=r"ingest.allow: expected a list"):
        load_yaml(tmp_path, "ingest:\n  allow: 10.0.0.0/8\n")
    with pytest.raises(ConfigError, match=r"bus.client_key_pair: expected a non-empty string"):
        load_yaml(tmp_path, "bus:\n  client_key_pair: ''\n")
