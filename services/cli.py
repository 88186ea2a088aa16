"""The ``wattflow`` command: one subcommand per service, plus up, simulate, tap, status, health,
keys."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from shared import config as config_mod
from shared import topics
from shared.service import EXIT_CANNOT_START, CannotStart, setup_logging

SERVICES = ("broker", "ingest", "storage", "power", "plotter", "dashboard")
SCALABLE = ("ingest", "storage", "power", "plotter")
log = logging.getLogger("wattflow")


def _service(name: str):
    """The service's run function (only its own module is imported: the others' dependencies
    are not needed to run one)."""
    import importlib

    module = "services.broker" if name == "broker" else f"services.{name}.main"
    return importlib.import_module(module).run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="YAML config (default: $WATTFLOW_CONFIG, else ./config.yaml, "
                             "else built-in defaults)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="overrides runtime.log_level")
    parser = argparse.ArgumentParser(
        prog="wattflow",
        description="Meter readings over TCP -> validated storage, power and live charts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    services = {}
    for name in SERVICES:
        services[name] = sub.add_parser(
            name, parents=[common], help=f"run the {name} service",
            description=f"Run the {name} service in the foreground (SIGTERM stops it after "
                        "flushing what is in flight).")
    up = sub.add_parser("up", parents=[common], help="run the whole stack as local processes",
                        description="Start broker, ingest, storage, power and plotter as local "
                                    "processes with merged, prefixed logs; Ctrl-C stops them all.")
    up.add_argument("--simulate", action="store_true", help="also start simulated meters")
    up.add_argument("--rate", type=float, default=10.0,
                    help="with --simulate: lines per second per meter (default 10)")
    up.add_argument("--scale", action="append", default=[], metavar="SERVICE=N",
                    type=_scale_arg,
                    help="run N instances of ingest, storage, power or plotter (repeatable; "
                         "default runtime.scale of the config, 1 each)")
    sim = sub.add_parser("simulate", parents=[common], help="send simulated meter lines",
                         description="Simulated meters (the configured ones), one TCP "
                                     "connection each, sending lines stamped with the time now.")
    sim.add_argument("--host", default="127.0.0.1", help="ingest host (default 127.0.0.1)")
    sim.add_argument("--port", type=int, help="ingest port (default: ingest.port of config)")
    sim.add_argument("--rate", type=float, default=10.0, help="lines per second per meter")
    sim.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    sim.add_argument("--invalid", type=float, default=0.0, metavar="FRACTION",
                     help="fraction of lines made invalid on purpose (default 0)")
    sim.add_argument("--meters", type=int, metavar="N",
                     help="simulate only the first N configured meters")
    sim.add_argument("--plain", action="store_true",
                     help="send like a meter that never reads (no acknowledged mode: lines "
                          "in flight when ingest dies are lost)")
    tap = sub.add_parser("tap", parents=[common], help="print bus messages as JSON lines",
                         description="Print every message on the given topics as one JSON "
                                     f"object per line. Topics: {', '.join(topics.BY_NAME)}.")
    tap.add_argument("topics", nargs="+", metavar="TOPIC", choices=list(topics.BY_NAME))
    tap.add_argument("--count", type=int, help="exit 0 after this many messages (1 on timeout)")
    tap.add_argument("--timeout", type=float, help="stop after this many seconds")
    tap.add_argument("--records", action="store_true",
                     help="one JSON object per record instead of per message (batch)")
    status = sub.add_parser("status", parents=[common], help="live counters of all services",
                            description="Listen to the stats topic and show one row per "
                                        "service instance. Exits 1 when a service is silent.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--wait", type=float, help="seconds to listen (default 2.5 intervals)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    psub = services["power"].add_subparsers(
        dest="power_command", metavar="ACTION",
        help="without one: run the service; recompute: rebuild stored power from readings")
    rec = psub.add_parser(
        "recompute", parents=[common], help="rebuild stored power from stored readings",
        description="Rebuild the stored power of a range from the stored readings (after a "
                    "change of circuits or of power.max_time_diff): the range's points are "
                    "computed again and replace what was there. Times: the meters' clocks, "
                    "e.g. '2024-04-27 12:00:00' (UTC, as stored). Default: everything stored.")
    rec.add_argument("--from", dest="t_from", metavar="TIME", help="first time (default: the "
                     "circuit's first reading)")
    rec.add_argument("--to", dest="t_to", metavar="TIME", help="last time (default: its last)")
    rec.add_argument("--circuit", action="append", default=[], metavar="NAME",
                     help="only this circuit (repeatable; default: all configured)")
    health = sub.add_parser("health", parents=[common], help="exit 0 if a local service is alive",
                            description="Check a service's heartbeat file in runtime.run_dir "
                                        "(for container health checks).")
    health.add_argument("service", choices=SERVICES)
    health.add_argument("--max-age", type=float, default=5.0, help="seconds (default 5)")
    keys = sub.add_parser(
        "keys", parents=[common], help="make CURVE key pairs for the bus",
        description="Make CURVE key pairs (NAME.key public, NAME.key_secret mode 0600) in "
                    "bus.keys_dir (or --dir) and allow each public key its roles by copying it "
                    "into allowed/<role folder>/. Without NAME: the broker's pair, 'client' "
                    "(the services: publish, subscribe, pull) and 'reader' (subscribe only, "
                    "for tap and status on other hosts). Never overwrites a file.")
    keys.add_argument("names", nargs="*", metavar="NAME", help="key pairs to make")
    keys.add_argument("--dir", help="where (default: bus.keys_dir of the config)")
    keys.add_argument("--allow", nargs="+", default=["subscribe"], metavar="ROLE",
                      help="roles of the NAMEs' keys: publish, subscribe, pull "
                           "(default: subscribe)")
    _export_parser(sub, common)
    return parser


# ---- wattflow export (services/export.py) ----------------------------------------------------

def _export_parser(sub, common) -> None:
    from services.dashboard.history import TIME_HELP

    ex = sub.add_parser(
        "export", parents=[common], help="readings or power from the database as CSV or JSON",
        description="Stream readings (default) or power points from the database, a chunk at a "
                    "time, with a progress bar on a terminal. Rows by meter or circuit, then "
                    "time; times as stored (the meters' clock, UTC).")
    ex.add_argument("--from", dest="t0", required=True, metavar="T", help=f"start: {TIME_HELP}")
    ex.add_argument("--to", dest="t1", default="now", metavar="T", help="end (default now)")
    ex.add_argument("--meter", action="append", default=[], nargs="+", metavar="IP",
                    help="readings of these meters (default: all)")
    ex.add_argument("--circuit", action="append", default=[], nargs="+", metavar="NAME",
                    help="power of these circuits (implies --power; default: all)")
    ex.add_argument("--power", action="store_true", help="power points instead of readings")
    ex.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                    help="csv (default) or jsonl (one JSON object per line)")
    ex.add_argument("--power-log", action="store_true",
                    help="the original program's power log: watts|YYYY-MM-DD HH:MM:SS.ffffff "
                         "per line, in time order (implies --power)")
    ex.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    ex.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    ex.add_argument("--chunk", type=int, default=50_000, metavar="ROWS",
                    help="rows read per query, the most held at once (default 50000)")


def cmd_export(cfg, args) -> int:
    from zoneinfo import ZoneInfo

    from services import export
    from services.dashboard.history import BadTime, parse_time
    from shared.db import NotReady, open_database, storage_url

    meters = [m for group in args.meter for m in group]
    circuits = [c for group in args.circuit for c in group]
    power = args.power or args.power_log or bool(circuits)
    if power and meters:
        print("wattflow export: --meter is for readings; --circuit (or --power) for power",
              file=sys.stderr)
        return 2
    known = [c.name for c in cfg.circuits] if power else [m.ip for m in cfg.meters]
    names = (circuits if power else meters) or known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"wattflow export: unknown {'circuit' if power else 'meter'} {unknown[0]!r} "
              f"(configured: {', '.join(known)})", file=sys.stderr)
        return 2
    now = time.time_ns() // 1000
    tz = ZoneInfo(cfg.dashboard["timezone"])
    try:
        t0, t1 = parse_time(args.t0, tz, now), parse_time(args.t1, tz, now)
    except BadTime as exc:
        print(f"wattflow export: {exc}", file=sys.stderr)
        return 2
    try:
        db = open_database(storage_url(cfg.storage), writer=False)
    except NotReady as exc:
        print(f"wattflow export: {exc}", file=sys.stderr)
        return 1
    fmt = "power-log" if args.power_log else args.format
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        rows = export.write(db, "power" if power else "readings", names, t0, t1, fmt, out,
                            args.progress, max(1, args.chunk))
    except BrokenPipeError:
        return 0
    finally:
        db.close()
        if args.output:
            out.close()
    log.info("exported %d rows to %s", rows, args.output or "stdout")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"wattflow: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or cfg.runtime["log_level"])
    if args.command in SERVICES and not getattr(args, "power_command", None):
        log.info("config: %s", cfg.source)
        try:
            return _service(args.command)(cfg)
        except (CannotStart, config_mod.ConfigError) as exc:  # e.g. a CURVE key file missing
            log.error("%s", exc)
            return EXIT_CANNOT_START
        except OSError as exc:
            log.error("%s cannot start: %s", args.command, exc)
            return 1
    if args.command == "power" and getattr(args, "power_command", None) == "recompute":
        return cmd_recompute(cfg, args)
    try:
        return {"up": cmd_up, "simulate": cmd_simulate, "tap": cmd_tap, "status": cmd_status,
                "health": cmd_health, "keys": cmd_keys,
                "export": cmd_export}[args.command](cfg, args)
    except config_mod.ConfigError as exc:
        print(f"wattflow: bad config: {exc}", file=sys.stderr)
        return 2


def _sigterm_like_ctrl_c() -> None:
    """Long-running commands stop on SIGTERM as on Ctrl-C (a container's `stop` sends SIGTERM,
    and as PID 1 a process that does not handle it is never stopped by it)."""
    def handle(_signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handle)


def _stop_on_signals() -> threading.Event:
    """For commands that loop over a bus socket (tap, status): Ctrl-C or SIGTERM only sets the
    returned flag, which the loop looks at between short waits. (An exception raised inside
    the socket's clean-up would leave a socket open and the context waiting for it at exit.)"""
    stop = threading.Event()

    def handle(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _scale_arg(text: str) -> tuple[str, int]:
    name, _, n = text.partition("=")
    if name not in SCALABLE or not n.isdigit() or not 1 <= int(n) <= 64:
        raise argparse.ArgumentTypeError(
            f"expected SERVICE=N with SERVICE one of {', '.join(SCALABLE)} and N 1..64, "
            f"got {text!r}")
    return name, int(n)


def cmd_up(cfg, args) -> int:
    from services.supervisor import Supervisor

    return Supervisor(cfg, args.config, simulate_rate=args.rate if args.simulate else None,
                      scale=dict(args.scale)).run()


def cmd_simulate(cfg, args) -> int:
    from services.simulator import simulate

    _sigterm_like_ctrl_c()
    meters = list(cfg.meters[: args.meters] if args.meters else cfg.meters)
    try:
        simulate(meters, args.host, args.port or cfg.ingest["port"], args.rate, args.duration,
                 args.invalid, acked=not args.plain)
    except ConnectionError as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_tap(cfg, args) -> int:
    import zmq

    from shared.bus import Subscriber
    from shared.messages import to_jsonable

    stop = _stop_on_signals()
    ctx = zmq.Context()
    try:
        sub = Subscriber(ctx, cfg.bus["subscribe"], [topics.BY_NAME[t] for t in args.topics],
                         cfg=cfg)
    except BaseException:
        ctx.term()
        raise
    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen = 0
    out = sys.stdout
    try:
        while (args.count is None or seen < args.count) and not stop.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            msg = sub.recv(200 if left is None else int(min(left, 0.2) * 1000) + 1)
            if msg is None:
                continue
            seen += 1
            head = {"topic": msg.topic.decode(), "src": msg.src, "seq": msg.seq, "t": msg.t}
            data = to_jsonable(msg.data)
            if args.records and isinstance(data, dict) and data and all(
                    isinstance(v, list) for v in data.values()):
                for i in range(len(next(iter(data.values())))):
                    out.write(json.dumps({**head, **{k: v[i] for k, v in data.items()}}) + "\n")
            else:
                out.write(json.dumps({**head, "data": data}) + "\n")
            out.flush()
    except BrokenPipeError:
        return 0
    finally:
        sub.close()
        ctx.term()
    if stop.is_set():
        return 0
    return 1 if args.count is not None and seen < args.count else 0


def cmd_recompute(cfg, args) -> int:
    from services.power.recompute import parse_time, recompute

    try:
        t_from = parse_time(args.t_from) if args.t_from else None
        t_to = parse_time(args.t_to) if args.t_to else None
        points = recompute(cfg, t_from, t_to, args.circuit)
    except ValueError as exc:
        print(f"wattflow power recompute: {exc}", file=sys.stderr)
        return 2
    print(f"recomputed: {points} power points stored")
    return 0


def cmd_status(cfg, args) -> int:
    from services.status import status

    stop = _stop_on_signals()
    code = status(cfg, args.json, args.wait, args.watch, stop)
    return 0 if stop.is_set() else code


def cmd_health(cfg, args) -> int:
    path = Path(cfg.runtime["run_dir"]) / f"{args.service}.heartbeat"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"{args.service}: no heartbeat file {path}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"{args.service}: heartbeat {age:.1f}s old (max {args.max_age}s)", file=sys.stderr)
        return 1
    problem = path.read_text(errors="replace").strip()
    if problem:
        print(f"{args.service}: alive but {problem}", file=sys.stderr)
        return 1
    print(f"{args.service}: alive (heartbeat {age:.1f}s ago)")
    return 0


def cmd_keys(cfg, args) -> int:
    from shared import auth

    where = Path(args.dir or cfg.bus["keys_dir"])
    if args.names:
        wanted = [(name, args.allow) for name in args.names]
    else:
        wanted = [("broker", []), ("client", ["publish", "subscribe", "pull"]),
                  ("reader", ["subscribe"])]
    for name, roles in wanted:
        try:
            public, secret = auth.make_keys(where, name, roles)
        except (FileExistsError, ValueError, OSError) as exc:
            print(f"wattflow keys: {exc}", file=sys.stderr)
            return 1
        allowed = f"allowed to {', '.join(roles)}" if roles else "the broker's own pair"
        print(f"{secret} (secret, 0600) and {public}: {allowed}")
    print(f"""
Switch CURVE on with bus.curve: true (or WATTFLOW_BUS_CURVE=true) everywhere, then:
  the broker's host needs   {where}/broker.key_secret (bus.broker_key_pair), and
                            {where}/allowed/ (bus.allowed_keys_dir): one folder per role
                            ({', '.join(f'{f}/ = {r}' for r, f in auth.ROLES.items())})
  every client needs        {where}/broker.key (bus.broker_public_key) and its own
                            *.key_secret as bus.client_key_pair (default client.key_secret;
                            tap/status on another host: reader.key_secret, e.g. with
                            WATTFLOW_BUS_CLIENT_KEY_PAIR=reader.key_secret)
Secret files stay on their host (copy them over a trusted channel). To allow another key, put
its .key file into the role folders on the broker's host (read again at the next connection);
to revoke one, delete it there (connections it already has open last until they close: restart
the broker to cut them).""")
    return 0
