"""power: validated readings in, ``power`` out (one pass and one message per batch)."""

from __future__ import annotations

import logging

from services.power.pairing import Pairing
from shared import topics
from shared.config import Config
from shared.service import Runtime

log = logging.getLogger("power")


def run(cfg: Config) -> int:
    rt = Runtime("power", cfg)
    rt.install_signals()
    pairing = Pairing(cfg.circuits, cfg.power["max_time_diff"])
    sub = rt.subscriber([topics.READING])
    pub = rt.publisher()
    if not cfg.circuits:
        log.warning("no circuits configured: power will publish nothing (see config 'circuits')")
    log.info("power up: %d circuits, max_time_diff %ss", len(cfg.circuits),
             cfg.power["max_time_diff"])
    try:
        while True:
            stopping = rt.stopping.is_set()
            msgs = sub.recv_batch(300 if stopping else 100, 100)
            if stopping and not msgs:
                break
            for msg in msgs:
                d = msg.data
                out = pairing.feed_columns(d["meter"], d["ts_us"], d["value"], d["t_recv"])
                rt.counters["readings_in"] += len(d["ts_us"])
                if len(out["ts_us"]):
                    pub.send(topics.POWER, out)
                    rt.counters["power_published"] += len(out["ts_us"])
            rt.counters["stale_readings"] = pairing.stale
            rt.tick()
    finally:
        rt.close()
    log.info("power stopped: %d points published", rt.counters["power_published"])
    return 0
