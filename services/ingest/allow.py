"""ingest's optional source allow-list (``ingest.allow``): networks meters may connect from.

A connection from elsewhere is closed at once, counted (``connections_refused_source``) and
logged the first time its address is seen (the addresses remembered for that are bounded, the
oldest forgotten first, so a flood from many addresses cannot grow memory).
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import MutableMapping
from functools import lru_cache

log = logging.getLogger("ingest")
REMEMBERED = 4096  # refused addresses remembered (so each is logged once)
_logged: OrderedDict[str, None] = OrderedDict()


@lru_cache(maxsize=4)
def _networks(allow: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(net, strict=False) for net in allow)


def allowed(allow: list[str], host: str) -> bool:
    """Is ``host`` (a peer address as the socket gives it) inside one of ``allow``'s networks?
    An empty list allows everyone."""
    if not allow:
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
    return any(addr in net for net in _networks(tuple(allow)))


def refuse_source(allow: list[str], host: str, counters: MutableMapping[str, int]) -> bool:
    """True (counted, logged once per address) if ``host`` may not connect."""
    if allowed(allow, host):
        return False
    counters["connections_refused_source"] += 1
    if host not in _logged:
        _logged[host] = None
        if len(_logged) > REMEMBERED:
            _logged.popitem(last=False)
        log.warning("refusing connections from %s: not in ingest.allow", host)
    return True
