"""The config's ``dashboard`` section: defaults, overrides, and bad values named by key."""

from __future__ import annotations

import pytest

from shared import config
from shared.config import ConfigError


def load_yaml(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return config.load(path, env=env or {})


def test_defaults_serve_this_machine_only(tmp_path):
    cfg = load_yaml(tmp_path, "")
    assert cfg.dashboard == {"host": "127.0.0.1", "port": 8080, "timezone": "UTC",
                             "stale_after_s": 10.0, "max_points": 1000, "refresh_s": 1.0}


def test_file_and_environment(tmp_path):
    cfg = load_yaml(tmp_path, "dashboard: {timezone: Europe/Berlin, stale_after_s: 3}",
                    env={"WATTFLOW_DASHBOARD_PORT": "9090", "WATTFLOW_DASHBOARD_HOST": "0.0.0.0"})
    assert cfg.dashboard["timezone"] == "Europe/Berlin" and cfg.dashboard["port"] == 9090
    assert cfg.dashboard["host"] == "0.0.0.0" and cfg.dashboard["stale_after_s"] == 3.0


@pytest.mark.parametrize("text,message", [
    ("dashboard: {timezone: Mars/Olympus}", "dashboard.timezone: expected a time zone name"),
    ("dashboard: {timezone: ../../etc/passwd}", "dashboard.timezone"),
    ("dashboard: {port: 0}", "dashboard.port: expected an integer 1..65535"),
    ("dashboard: {max_points: 5}", "dashboard.max_points"),
    ("dashboard: {stale_after_s: -1}", "dashboard.stale_after_s: expected a number above 0"),
    ("dashboard: {refresh: 1}", "dashboard.refresh: unknown key"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_yaml(tmp_path, text)
