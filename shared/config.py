"""The one config loader: YAML file + environment overrides -> a frozen, validated Config.

Where the file comes from: ``--config PATH``, else ``$WATTFLOW_CONFIG``, else ``./config.yaml``
when present, else the built-in defaults (the original program's five meters).

Every scalar key can be overridden from the environment as ``WATTFLOW_<SECTION>_<KEY>``
(``WATTFLOW_INGEST_PORT=5000``, ``WATTFLOW_STORAGE_PATH=/data/w.db``); top-level scalars as
``WATTFLOW_<KEY>`` (``WATTFLOW_METERS_FILE``). A bad value stops the program at start with a
message naming the key (``ConfigError: ingest.port: expected an integer 1..65535, got 'x'``).
"""

from __future__ import annotations

import copy
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "WATTFLOW_"
UNITS = {"V": "V", "В": "V", "VOLT": "V", "A": "A", "А": "A", "AMP": "A"}  # Latin and Cyrillic

DEFAULT_METERS = [
    {"ip": "10.0.0.1", "unit": "V", "range": [0, 110]},
    {"ip": "10.0.0.2", "unit": "A", "range": [0, 0.5]},
    {"ip": "10.0.0.3", "unit": "A", "range": [0.2, 1]},
    {"ip": "10.0.0.4", "unit": "A", "range": [1, 5]},
    {"ip": "10.0.0.5", "unit": "A", "range": [3, 10]},
]

DEFAULTS: dict[str, Any] = {
    "meters": DEFAULT_METERS,
    "meters_file": None,
    "circuits": None,
    "bus": {
        "publish": "tcp://127.0.0.1:5550",
        "subscribe": "tcp://127.0.0.1:5551",
        "push": "tcp://127.0.0.1:5552",  # the work queue: numbered batches in (ingest, power)
        "pull": "tcp://127.0.0.1:5553",  # ... and out, one storage replica each
        "hwm": 10000,
        "pull_hwm": 20,  # batches waiting at one storage replica (the rest wait at the broker)
        "work_hwm": 50,  # batches the work queue holds per socket: a short queue (a batch
        # waiting longer than ingest.ack_timeout_s would be sent again)
        # CURVE encryption and authentication on every bus socket (shared/auth.py)
        "curve": False,
        "keys_dir": "keys",  # the key paths below are relative to it (unless absolute)
        "broker_public_key": "broker.key",  # every client: whom it talks to
        "broker_key_pair": "broker.key_secret",  # the broker only
        "client_key_pair": "client.key_secret",  # every service, tap and status
        "allowed_keys_dir": "allowed",  # the broker only: <role folder>/*.key per role
    },
    # loopback unless configured otherwise: the bus is not for other hosts by default
    "broker": {"xsub_bind": "tcp://127.0.0.1:5550", "xpub_bind": "tcp://127.0.0.1:5551",
               "work_in_bind": "tcp://127.0.0.1:5552", "work_out_bind": "tcp://127.0.0.1:5553"},
    "ingest": {
        "host": "0.0.0.0",
        "port": 44444,
        "max_line": 1024,
        "batch_lines": 5000,
        "flush_ms": 1,
        "idle_timeout_s": 600,
        "max_connections": 10000,
        "max_buffer_mb": 256,
        "ack_timeout_s": 2.0,
        "stop_timeout_s": 10.0,
        "journal_dir": "data/journal",
        "journal_fsync": False,
        "reuse_port": True,
        "unjournaled_kb": 512,
        "unjournaled_kb_per_connection": 64,
        "allow": [],  # networks (CIDR) meters may connect from; empty: any
    },
    "storage": {
        "url": None,
        "path": "data/wattflow.db",
        "batch_max": 10,
        "wal_max_mb": 64,
        "min_free_mb": 256,
        "retention": {
            "readings_days": 30,
            "power_days": 30,
            "rejected_days": 30,
            "rollup_1m_days": 400,
            "rollup_1h_days": 0,
        },
    },
    "power": {"max_time_diff": 0.5, "lateness_s": 60, "max_readings_per_meter": 2_000_000},
    "plotter": {"dir": "plots", "window_s": 300, "interval_s": 1.0, "max_points": 3000},
    "runtime": {"run_dir": "/tmp/wattflow", "log_level": "INFO", "stats_interval_s": 1.0,
                "scale": {"ingest": 1, "storage": 1, "power": 1, "plotter": 1}},
    # the dashboard (services/dashboard): a web page of live charts, history, energy, export
    "dashboard": {"host": "127.0.0.1", "port": 8080, "timezone": "UTC", "stale_after_s": 10.0,
                  "max_points": 1000, "refresh_s": 1.0},
}


class ConfigError(ValueError):
    """A config problem, with the key it concerns."""


@dataclass(frozen=True, slots=True)
class Meter:
    ip: str
    unit: str  # "V" or "A"
    range_start: float
    range_stop: float


@dataclass(frozen=True, slots=True)
class Circuit:
    name: str
    voltage: str  # ip of the V meter
    current: str  # ip of the A meter


@dataclass(frozen=True)
class Config:
    meters: tuple[Meter, ...]
    circuits: tuple[Circuit, ...]
    bus: dict[str, Any]
    broker: dict[str, Any]
    ingest: dict[str, Any]
    storage: dict[str, Any]
    power: dict[str, Any]
    plotter: dict[str, Any]
    runtime: dict[str, Any]
    source: str = "built-in defaults"
    meter_by_ip: dict[str, Meter] = field(default_factory=dict, compare=False)
    dashboard: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS["dashboard"]))


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path is None and Path("config.yaml").is_file():
        path = "config.yaml"
    raw = copy.deepcopy(DEFAULTS)
    source = "built-in defaults"
    base_dir = Path.cwd()
    if path is not None:
        file_data = _read_yaml(Path(path))
        _merge(raw, file_data)
        source, base_dir = str(path), Path(path).resolve().parent
    _apply_env(raw, env)
    return _build(raw, source, base_dir)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key (known: {', '.join(DEFAULTS)})")
    return data


def _merge(raw: dict[str, Any], data: dict[str, Any], prefix: str = "") -> None:
    for key, value in data.items():
        if isinstance(raw.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a mapping, got {value!r}")
            unknown = set(value) - set(raw[key])
            if unknown:
                known = ", ".join(raw[key])
                raise ConfigError(f"{prefix}{key}.{sorted(unknown)[0]}: unknown key "
                                  f"(known: {known})")
            _merge(raw[key], value, prefix=f"{prefix}{key}.")
        else:
            raw[key] = value


def _apply_env(raw: dict[str, Any], env: dict[str, str], prefix: str = ENV_PREFIX) -> None:
    for key, value in raw.items():
        name = f"{prefix}{key}".upper()
        if isinstance(value, dict):  # a section, or a mapping inside one
            _apply_env(value, env, name + "_")
        elif prefix == ENV_PREFIX:  # top-level scalars are strings (meters_file)
            if key not in ("meters", "circuits") and name in env:
                raw[key] = env[name]
        elif name in env:
            raw[key] = yaml.safe_load(env[name]) if env[name] else None


def _build(raw: dict[str, Any], source: str, base_dir: Path) -> Config:
    if raw["meters_file"]:
        meters_path = base_dir / str(raw["meters_file"])
        meters = parse_meter_file(meters_path)
    else:
        meters = _meters(raw["meters"])
    by_ip = {m.ip: m for m in meters}
    circuits = _circuits(raw["circuits"], meters, by_ip)
    _check_sections(raw)
    return Config(
        meters=tuple(meters),
        circuits=tuple(circuits),
        bus=raw["bus"],
        broker=raw["broker"],
        ingest=raw["ingest"],
        storage=raw["storage"],
        power=raw["power"],
        plotter=raw["plotter"],
        runtime=raw["runtime"],
        source=source,
        meter_by_ip=by_ip,
        dashboard=raw["dashboard"],
    )


def normalize_unit(unit: Any, key: str) -> str:
    norm = UNITS.get(str(unit).strip().upper())
    if norm is None:
        raise ConfigError(f"{key}: unit must be V or A (Latin or Cyrillic), got {unit!r}")
    return norm


def _meter(ip: Any, unit: Any, start: Any, stop: Any, key: str) -> Meter:
    if not isinstance(ip, str) or not ip.strip() or any(c in ip for c in "\t\n "):
        raise ConfigError(f"{key}.ip: expected a meter id such as 10.0.0.1, got {ip!r}")
    lo, hi = _number(start, f"{key}.range_start"), _number(stop, f"{key}.range_stop")
    if lo > hi:
        raise ConfigError(f"{key}: range start {lo} is above range stop {hi}")
    return Meter(ip.strip(), normalize_unit(unit, f"{key}.unit"), lo, hi)


def _meters(items: Any) -> list[Meter]:
    if not isinstance(items, list) or not items:
        raise ConfigError("meters: expected a non-empty list of {ip, unit, range: [start, stop]}")
    meters = []
    for i, item in enumerate(items):
        key = f"meters[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{key}: expected a mapping, got {item!r}")
        unknown = set(item) - {"ip", "unit", "range", "range_start", "range_stop"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key")
        if "range" in item:
            rng = item["range"]
            if not isinstance(rng, list) or len(rng) != 2:
                raise ConfigError(f"{key}.range: expected [start, stop], got {rng!r}")
            start, stop = rng
        else:
            start, stop = item.get("range_start"), item.get("range_stop")
        meters.append(_meter(item.get("ip"), item.get("unit"), start, stop, key))
    _no_duplicates(meters)
    return meters


def _no_duplicates(meters: list[Meter]) -> None:
    seen: set[str] = set()
    for m in meters:
        if m.ip in seen:
            raise ConfigError(f"meters: meter {m.ip} is listed twice")
        seen.add(m.ip)


def parse_meter_file(path: Path) -> list[Meter]:
    """The original program's meter file: one meter per line, ``ip<TAB>start<TAB>stop<TAB>unit``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"meters_file: cannot read {path}: {exc}") from None
    meters = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) != 4:
            raise ConfigError(
                f"meters_file {path}:{lineno}: expected ip, start, stop, unit separated by tabs"
            )
        ip, start, stop, unit = (p.strip() for p in parts)
        meters.append(_meter(ip, unit, start, stop, key=f"meters_file {path}:{lineno}"))
    if not meters:
        raise ConfigError(f"meters_file {path}: no meters in the file")
    _no_duplicates(meters)
    return meters


def _circuits(items: Any, meters: list[Meter], by_ip: dict[str, Meter]) -> list[Circuit]:
    if items is None:  # the original set-up: one V meter paired with every A meter
        volts = [m for m in meters if m.unit == "V"]
        if len(volts) != 1:
            return []
        v = volts[0]
        return [Circuit(m.ip, v.ip, m.ip) for m in meters if m.unit == "A"]
    if not isinstance(items, list):
        raise ConfigError("circuits: expected a list of {name, voltage, current}")
    circuits, names = [], set()
    for i, item in enumerate(items):
        key = f"circuits[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "voltage", "current"}:
            raise ConfigError(f"{key}: expected a mapping with name, voltage, current")
        for role, unit in (("voltage", "V"), ("current", "A")):
            ip = item.get(role)
            if ip not in by_ip:
                raise ConfigError(f"{key}.{role}: {ip!r} is not a configured meter")
            if by_ip[ip].unit != unit:
                raise ConfigError(f"{key}.{role}: meter {ip} measures {by_ip[ip].unit}, not {unit}")
        name = str(item.get("name") or item["current"])
        if name in names:
            raise ConfigError(f"{key}.name: circuit {name!r} is listed twice")
        names.add(name)
        circuits.append(Circuit(name, item["voltage"], item["current"]))
    return circuits


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        num = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(num):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return num


_INTS = {
    ("ingest", "port"): (1, 65535),
    ("ingest", "max_line"): (16, 1 << 20),
    ("ingest", "batch_lines"): (1, 1_000_000),
    ("ingest", "max_connections"): (1, 1_000_000),
    ("storage", "batch_max"): (1, 10_000),
    ("power", "max_readings_per_meter"): (1000, 1_000_000_000),
    ("plotter", "max_points"): (10, 1_000_000),
    ("bus", "hwm"): (1, 10_000_000),
    ("bus", "pull_hwm"): (1, 10_000_000),
    ("bus", "work_hwm"): (1, 10_000_000),
    ("dashboard", "port"): (1, 65535),
    ("dashboard", "max_points"): (10, 100_000),
}
_POSITIVE = {
    ("ingest", "flush_ms"),
    ("ingest", "idle_timeout_s"),
    ("ingest", "max_buffer_mb"),
    ("ingest", "ack_timeout_s"),
    ("ingest", "stop_timeout_s"),
    ("ingest", "unjournaled_kb"),
    ("ingest", "unjournaled_kb_per_connection"),
    ("power", "max_time_diff"),
    ("power", "lateness_s"),
    ("plotter", "window_s"),
    ("plotter", "interval_s"),
    ("runtime", "stats_interval_s"),
    ("dashboard", "stale_after_s"),
    ("dashboard", "refresh_s"),
}
_STRINGS = {
    ("bus", "publish"),
    ("bus", "subscribe"),
    ("bus", "keys_dir"),
    ("bus", "broker_public_key"),
    ("bus", "broker_key_pair"),
    ("bus", "client_key_pair"),
    ("bus", "allowed_keys_dir"),
    ("broker", "xsub_bind"),
    ("broker", "xpub_bind"),
    ("broker", "work_in_bind"),
    ("broker", "work_out_bind"),
    ("bus", "push"),
    ("bus", "pull"),
    ("ingest", "host"),
    ("ingest", "journal_dir"),
    ("storage", "path"),
    ("plotter", "dir"),
    ("runtime", "run_dir"),
    ("runtime", "log_level"),
    ("dashboard", "host"),
    ("dashboard", "timezone"),
}


def _networks(items: Any, key: str) -> list[str]:
    """A list of networks (``10.0.0.0/8``, ``192.168.1.7``, ``fd00::/8``), checked, as text."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{key}: expected a list of networks such as [10.0.0.0/8], got {items!r}")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{key}[{i}]: expected a network such as 10.0.0.0/8 or "
                              f"192.168.1.7, got {item!r}") from None
    return out


def _check_sections(raw: dict[str, Any]) -> None:
    for (section, key), (lo, hi) in _INTS.items():
        value = raw[section][key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{section}.{key}: expected an integer {lo}..{hi}, got {value!r}")
    for section, key in _POSITIVE:
        value = _number(raw[section][key], f"{section}.{key}")
        if value <= 0:
            raise ConfigError(f"{section}.{key}: expected a number above 0, got {value!r}")
        raw[section][key] = value
    for section, key in _STRINGS:
        value = raw[section][key]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{section}.{key}: expected a non-empty string, got {value!r}")
    url = raw["storage"]["url"]
    if url is not None and not (isinstance(url, str) and (
            url.startswith(("sqlite:///", "postgresql://", "postgres://")))):
        raise ConfigError(f"storage.url: expected sqlite:///PATH or postgresql://..., got {url!r}")
    for key in ("wal_max_mb", "min_free_mb"):
        value = _number(raw["storage"][key], f"storage.{key}")
        if value < (1 if key == "wal_max_mb" else 0):
            raise ConfigError(f"storage.{key}: expected a number of at least "
                              f"{1 if key == 'wal_max_mb' else 0}, got {value!r}")
        raw["storage"][key] = value
    for key, value in raw["runtime"]["scale"].items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise ConfigError(f"runtime.scale.{key}: expected an integer 1..64, got {value!r}")
    for key, value in raw["storage"]["retention"].items():
        days = _number(value, f"storage.retention.{key}")
        if days < 0:
            raise ConfigError(f"storage.retention.{key}: expected days >= 0 (0: keep forever), "
                              f"got {value!r}")
        raw["storage"]["retention"][key] = days
    for section, key in (("ingest", "journal_fsync"), ("ingest", "reuse_port"),
                         ("bus", "curve")):
        value = raw[section][key]
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key}: expected true or false, got {value!r}")
    raw["ingest"]["allow"] = _networks(raw["ingest"]["allow"], "ingest.allow")
    _check_timezone(raw["dashboard"]["timezone"])
    level = raw["runtime"]["log_level"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"runtime.log_level: expected DEBUG, INFO, WARNING or ERROR, got {level}")
    raw["runtime"]["log_level"] = level


def _check_timezone(name: str) -> None:
    """dashboard.timezone must be an IANA zone name that zoneinfo knows."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"dashboard.timezone: expected a time zone name such as UTC or "
                          f"Europe/Berlin, got {name!r}") from None
