"""CURVE keys and the broker's ZAP authenticator: which client keys may do what on the bus.

With ``bus.curve`` on, every socket the broker binds is a CURVE server whose ZAP domain is a
*role*, and every client socket is a CURVE client with this process's key pair. A client's
public key is allowed a role by lying in that role's folder under ``bus.allowed_keys_dir``:

=========== ============== ===========================================================
role        folder         what a key allowed it may do
=========== ============== ===========================================================
publish     publishers/    send on the bus (the broker's XSUB; a work queue's PULL)
subscribe   subscribers/   receive copies of topics (the broker's XPUB)
pull        pullers/       take batches off a work queue (its PUSH): one batch, one taker
=========== ============== ===========================================================

A key allowed only to subscribe cannot publish (the XSUB asks ZAP for ``publish``), and reading
is not taking: a key that may subscribe cannot pull batches away from storage.

The authenticator is pyzmq's ``ThreadAuthenticator`` with a credentials callback per role that
re-reads a role's folder when it changes (adding or removing a key file needs no restart; ZAP
runs at connection time, so a removed key's open connections last until they reconnect). The
user id of an allowed connection is the key file's name. Refusals are counted and logged once
per key and role. Sockets bound with ``ZAP_ENFORCE_DOMAIN``: no authenticator, no entry.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import MutableMapping
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from shared.config import Config, ConfigError

log = logging.getLogger("auth")
ROLES = {"publish": "publishers", "subscribe": "subscribers", "pull": "pullers"}
LOGGED_MAX = 1024  # refused (role, key) pairs remembered so each is logged once


class KeyProblem(ConfigError):
    """A key file or folder that CURVE needs is missing or unreadable (says which key)."""


def key_path(cfg: Config, key: str) -> Path:
    """Where ``bus.<key>`` points: relative paths are under ``bus.keys_dir``."""
    return Path(cfg.bus["keys_dir"]) / cfg.bus[key]


def allowed_dir(cfg: Config, role: str) -> Path:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    return key_path(cfg, "allowed_keys_dir") / ROLES[role]


def public_key(cfg: Config, key: str) -> bytes:
    return _load(key_path(cfg, key), f"bus.{key}")[0]


def key_pair(cfg: Config, key: str) -> tuple[bytes, bytes]:
    path = key_path(cfg, key)
    public, secret = _load(path, f"bus.{key}")
    if secret is None:
        raise KeyProblem(f"bus.{key}: {path} holds only a public key; the key pair is the "
                         ".key_secret file `wattflow keys` wrote beside it")
    return public, secret


def _load(path: Path, key: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyProblem(f"{key}: cannot read a CURVE key from {path}: {exc} (make key pairs "
                         "with `wattflow keys`, see README 'Security')") from None
    if secret is not None and path.stat().st_mode & 0o077:
        log.warning("%s: %s can be read by other users (chmod 600 it)", key, path)
    return public, secret


def make_keys(directory: Path, name: str, roles: list[str]) -> tuple[Path, Path]:
    """A new key pair ``<name>.key`` (public) and ``<name>.key_secret`` (mode 0600) in
    ``directory``, its public key allowed each of ``roles`` (copied into their folders under
    ``directory/allowed``). Existing files are never overwritten."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (known: {', '.join(ROLES)})")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists: not overwritten (delete it first)")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    public.chmod(0o644)
    for role in ROLES:  # every role's folder exists, so the broker can start with none allowed
        (directory / "allowed" / ROLES[role]).mkdir(parents=True, exist_ok=True)
    for role in roles:
        copy = directory / "allowed" / ROLES[role] / public.name
        copy.write_bytes(public.read_bytes())
        copy.chmod(0o644)
    return public, secret


class AllowedKeys:
    """The credentials callback: is this key in the folder of the role asked for?"""

    def __init__(self, root: Path, counters: MutableMapping[str, int]):
        self.root = root
        self.counters = counters
        self.keys: dict[str, dict[bytes, str]] = {}  # role -> z85 public key -> name
        self.mtime: dict[str, int] = {}
        self.logged: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.address = ""  # of the request being decided (set by the authenticator)
        for role in ROLES:  # keys made now: other threads copy these counters
            counters[f"auth_ok.{role}"] = counters[f"auth_refused.{role}"] = 0

    def folder(self, role: str) -> Path:
        return self.root / ROLES[role]

    def _reload(self, role: str) -> dict[bytes, str]:
        folder = self.folder(role)
        try:
            mtime = folder.stat().st_mtime_ns
        except OSError:
            mtime = -1
        if self.mtime.get(role) != mtime:
            self.mtime[role] = mtime
            keys: dict[bytes, str] = {}
            for path in sorted(folder.glob("*.key")) if mtime != -1 else ():
                try:
                    keys[zmq.auth.load_certificate(path)[0]] = path.stem
                except (OSError, ValueError) as exc:
                    log.error("allowed key %s ignored: %s", path, exc)
            self.keys[role] = keys
            log.info("%d keys may %s (%s)", len(keys), role, folder)
        return self.keys[role]

    def name(self, z85_key: bytes) -> str | None:
        for keys in self.keys.values():
            if z85_key in keys:
                return keys[z85_key]
        return None

    def callback(self, domain: str, z85_key: bytes) -> bool:
        allowed = domain in ROLES and z85_key in self._reload(domain)
        self.counters[f"auth_{'ok' if allowed else 'refused'}.{domain}"] += 1
        if not allowed and (domain, z85_key) not in self.logged:
            self.logged[(domain, z85_key)] = None
            if len(self.logged) > LOGGED_MAX:
                self.logged.popitem(last=False)
            log.warning("refused key %s from %s: not allowed to %s (not in %s)",
                        z85_key.decode(errors="replace"), self.address or "?", domain,
                        self.folder(domain) if domain in ROLES else "any role folder")
        return allowed


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with a callback per role and the key file's name as user id."""

    def __init__(self, ctx: zmq.Context, allowed: AllowedKeys):
        super().__init__(ctx, log=logging.getLogger("auth.zap"))
        self.allowed = allowed
        for role in ROLES:
            self.configure_curve_callback(role, allowed)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.allowed.address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key)
        return self.allowed.name(key) or key.decode()


def start_authenticator(ctx: zmq.Context, cfg: Config,
                        counters: MutableMapping[str, int]) -> Authenticator | None:
    """Start the ZAP handler of ``ctx`` (before binding): None when ``bus.curve`` is off."""
    if not cfg.bus["curve"]:
        return None
    root = key_path(cfg, "allowed_keys_dir")
    if not root.is_dir():
        raise KeyProblem(f"bus.allowed_keys_dir: {root} is not a folder (make it with "
                         "`wattflow keys`, see README 'Security')")
    auth = Authenticator(ctx, AllowedKeys(root, counters))
    auth.start()
    return auth
