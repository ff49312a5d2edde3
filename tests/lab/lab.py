"""The NAT lab: two hosts behind Linux NAT routers, an "internet" router, and a server namespace (pub).

    a (10.0.1.2) -- nat-a (WAN 198.51.100.2) -- inet -- nat-b (WAN 198.51.100.6) -- b (10.0.2.2)
                                                  |                                +- c (10.0.2.3)
                                    pub (203.0.113.10, 203.0.113.11): coturn STUN, SMTP submission, Dovecot

Host c shares b's LAN (a bridge in nat-b) and NAT, which does not hairpin (masquerade alone does not): a
packet from c to nat-b's WAN address ends at nat-b. It is the home LAN of issue 18; the other tests leave it
idle. It is only ever behind nat-b's NAT (b's mode "none" gives it no way out).

Opt-in (double_nat): a's home router behind a carrier NAT, the double NAT of issue 18. Namespace cgn takes
nat-a's place on inet's link: nat-a's WAN gets an address of the carrier's inside (100.64.0.2, RFC 6598),
the carrier masquerades onto its own WAN address (198.51.100.10), endpoint-independently like most CGNATs,
and drops new WAN traffic as the home routers do.

    a -- nat-a (WAN 100.64.0.2) -- cgn (WAN 198.51.100.10) -- inet -- ...

Every namespace name carries a per-instance prefix (px + 6 hex digits + "-"), so labs run side by side. Veth
pairs are created directly inside their namespaces, so interface names never meet in the root namespace.
In mode "none" a host is public: it moves to an address in a /27 that inet routes via its router
(198.51.100.66 for a, 198.51.100.98 for b) and the router only routes.

IPv6 (issue 18) runs beside IPv4 on every link, global addresses of the documentation prefix, no NAT66:

    a (2001:db8:a::2) -- nat-a -- inet -- nat-b -- b (2001:db8:b::2), c (2001:db8:b::3)
                                    |
                  pub (2001:db8:ff::10, 2001:db8:ff::11): coturn STUN and TURN on both families

Each site's LAN is a /64 (2001:db8:a::/64, 2001:db8:b::/64; the router is ::1), each WAN link to inet a /64
(2001:db8:1:a::/64, 2001:db8:1:b::/64; inet ::1, the router ::2), pub's link 2001:db8:ff::/64 (inet ::1). Each
home router is a stateful IPv6 firewall (table ip6 plexus_fw6, as RFC 6092 has home routers): what the LAN
started comes back in, new traffic from the WAN is dropped, so a simultaneous UDP open gets through at once
while the same hosts' IPv4 may sit behind symmetric NATs. The NAT modes are IPv4's alone: in mode "none" the
host's IPv6 stays behind its firewall. The carrier NAT only routes IPv6 (carriers hand out native IPv6; the
home router filters): its inside link is 2001:db8:64::/64 and it takes nat-a's place on 2001:db8:1:a::/64.
set_ipv6(host, False) takes a host's global address and IPv6 default route away (an IPv4-only network).
Addresses skip duplicate address detection (accept_dad=0 in every namespace, so link-local addresses too:
a router resolves neighbours from its link-local address), and up() waits until every host reaches pub over
IPv6 rather than sleeping. `ip netns exec` gives each host namespace /etc/netns/NAME/hosts, where
stun.lab.test (STUN_NAME) has an A and an AAAA record and mail.lab.test an A record.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from aioice import stun

from plexus.endpoint import Endpoint
from tests.lab import netns, wire
from tests.lab.pki import make_pki

T = TypeVar("T")
NatMode = Literal["cone", "fullcone", "symmetric", "none"]
NAT_MODES: tuple[NatMode, ...] = ("cone", "fullcone", "symmetric", "none")
NAMESPACES = ("a", "nat-a", "cgn", "inet", "nat-b", "b", "c", "pub")
HOSTS = ("a", "b", "c")
REGISTRY = Path("/run/plexus-lab")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts NETNS_ETC/NAME/hosts over /etc/hosts
PREFIX_RE = re.compile(r"^px[0-9a-f]{6}-")
NOBODY = 65534  # owner of the mailboxes: Dovecot refuses root as mail user
SERVER_WAIT_S = 20.0


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class Account:
    address: str
    login: str
    password: str


@dataclass(frozen=True)
class TurnAccount:
    """The lab's TURN service: coturn on the STUN port, long-term credentials."""

    server: Endpoint
    user: str
    password: str
    realm: str


@dataclass(frozen=True)
class _Site:
    """One side of the topology: a host behind its NAT router."""

    lan_net: str  # host's private /24 prefix, e.g. "10.0.1"
    wan_ip: str  # router's WAN address (the host's public address behind NAT)
    inet_ip: str  # inet's end of the WAN /30
    public_net: str  # the /27 a host in mode "none" lives in, e.g. "198.51.100.64"
    public_gw: str
    public_ip: str
    lan6: str  # the LAN's /64 as an address prefix, e.g. "2001:db8:a::": router ::1, host ::2
    wan6: str  # the /64 between the router and inet: inet ::1, the router (or the carrier NAT) ::2
    neighbours: tuple[str, ...] = ()  # more hosts on the LAN, always behind the NAT (.3, .4, ...)


SITES: dict[str, _Site] = {
    "a": _Site("10.0.1", "198.51.100.2", "198.51.100.1", "198.51.100.64", "198.51.100.65", "198.51.100.66",
               "2001:db8:a::", "2001:db8:1:a::"),
    "b": _Site("10.0.2", "198.51.100.6", "198.51.100.5", "198.51.100.96", "198.51.100.97", "198.51.100.98",
               "2001:db8:b::", "2001:db8:1:b::", ("c",)),
}  # fmt: skip
NEIGHBOURS = {host: site for site in SITES.values() for host in site.neighbours}
# The carrier NAT in front of nat-a (double_nat): its inside /30, nat-a's WAN at .2, and its WAN /30 to inet
CARRIER_INSIDE, CARRIER_WAN, CARRIER_UPLINK = "100.64.0", "198.51.100.10", "198.51.100.9"
CARRIER_INSIDE6 = "2001:db8:64::"  # the carrier's inside /64 (cgn ::1, nat-a ::2): IPv6 is only routed
PUB_NET6 = "2001:db8:ff::"  # pub's link: inet ::1, pub ::10 and ::11
DISCARD_PORT = 9  # nothing listens there: a datagram to it comes back as ICMP port unreachable

# Conntrack must not learn unsolicited WAN traffic, neither forwarded nor addressed to the router itself: an
# entry created by a stray inbound packet would take the host's port and Linux NAT would then look symmetric.
_NFT_TEMPLATE = """\
table ip plexus_nat
delete table ip plexus_nat
table ip plexus_nat {{
{chains}
}}
"""
_NFT_FILTER = """\
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state established,related accept
{extra_forward}        iifname "wan" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat;
{masquerade}
    }}
"""
# The outer port ranges remap() moves a host's mappings into, in turn: every new mapping gets a new port.
REMAP_RANGES = ("20000-29999", "30000-39999")
READDRESSED = 12  # readdress: the last byte of the host's address on its LAN after the move (.2 before)
RENUMBERED_OFFSET = 6  # renumber: the outer address's place in the site's public /27 (a host in "none" has 2)
# Endpoint-independent filtering: whatever reaches the WAN address on a UDP port goes to the host's same port
# (masquerade keeps the host's port when it is free, which it is in the lab).
_NFT_FULLCONE = """\
    chain prerouting {{
        type nat hook prerouting priority dstnat;
        iifname "wan" meta l4proto udp dnat to {host_ip}
    }}
"""
# IPv6 has no NAT66: the home router is a stateful firewall. Neighbour discovery addressed to the router
# itself must pass; ICMPv6 errors about the LAN's own flows are "related".
_NFT_FIREWALL6 = """\
table ip6 plexus_fw6 {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
        iifname "wan" drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
}
"""
_NFT_COUNTER = """\
table ip plexus_count {
    counter wan_udp { }
    chain prerouting {
        type filter hook prerouting priority raw - 10;
        iifname "wan" meta l4proto udp counter name "wan_udp"
    }
}
"""


def _site(host: str) -> _Site:
    if host not in SITES:
        raise ValueError(f"unknown lab host {host!r}; expected 'a' or 'b'")
    return SITES[host]


def _neighbour_ip(host: str) -> str | None:
    """The address of a host that shares another's LAN (c), None for a and b."""
    site = NEIGHBOURS.get(host)
    return None if site is None else f"{site.lan_net}.{3 + site.neighbours.index(host)}"


def _nft_loss(loss_pct: float) -> str:
    rules = ""
    if loss_pct:
        # numgen draws per packet; a per-mille threshold keeps fractional percentages meaningful. Both
        # families lose packets; neighbour discovery is spared, as ARP is (it never meets an ip table).
        threshold = min(max(round(loss_pct * 10), 1), 1000)
        rules = f"""
    chain inbound {{
        type filter hook prerouting priority raw - 20;
        icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
        iifname "wan" numgen random mod 1000 <= {threshold - 1} drop
    }}
    chain outbound {{
        type filter hook postrouting priority srcnat + 10;
        icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
        oifname "wan" numgen random mod 1000 <= {threshold - 1} drop
    }}"""
    return f"table inet plexus_link\ndelete table inet plexus_link\ntable inet plexus_link {{{rules}\n}}\n"


def nft_ruleset(mode: NatMode, host_ip: str, ports: str | None = None, outer: str | None = None) -> str:
    """The NAT router's table for `mode`; `ports`, a range such as "20000-29999", for the outer ports
    (remap), else the host's own port where it is free; `outer`, the outer address (renumber), else the
    router's WAN address."""
    if mode == "none":
        return _NFT_TEMPLATE.format(chains="")
    random = " fully-random" if mode == "symmetric" else ""
    to = "masquerade" if outer is None else f"snat ip to {outer}"
    masquerade = f'        oifname "wan" {to}{random}'
    if ports:  # a port range needs the protocol named; the rest (ICMP) is masqueraded as before
        ranged = f'        oifname "wan" meta l4proto {{ tcp, udp }} {to}:{ports}{random}'
        if outer is None:
            ranged = ranged.replace("masquerade:", "masquerade to :")
        masquerade = f"{ranged}\n{masquerade}"
    chains = _NFT_FILTER.format(
        extra_forward='        iifname "wan" ct status dnat accept\n' if mode == "fullcone" else "",
        masquerade=masquerade,
    )
    if mode == "fullcone":
        chains += _NFT_FULLCONE.format(host_ip=host_ip)
    return _NFT_TEMPLATE.format(chains=chains.rstrip("\n"))


def run(
    argv: Sequence[str], *, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(popen: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after grace_s; always reaps it."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def lab_available() -> str | None:
    """None if this machine can run the lab, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces)"
    missing = [
        tool for tool in ("ip", "nft", "conntrack", "tc", "turnserver", "dovecot") if not shutil.which(tool)
    ]
    if missing:
        return f"the NAT lab needs these tools: {', '.join(missing)}"
    probe = f"pxprobe{secrets.token_hex(3)}"
    result = run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"ip netns unusable: {result.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    return None


class _Server:
    """A daemon in the foreground inside a namespace; popen.pid is the daemon itself (ip netns exec execs)."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, namespace: str) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C in a terminal reaches only the lab, which stops its servers.
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen)
        self.popen = None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        if not self.running:
            code = None if self.popen is None else self.popen.returncode
            raise LabError(f"{self.name} is not running (exit code {code}).\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log})"
        return f"--- last lines of {self.log} ---\n" + "\n".join(text[-lines:])


class Lab:
    STUN_PRIMARY: ClassVar[Endpoint] = Endpoint("203.0.113.10", 3478)
    STUN_ALTERNATE: ClassVar[Endpoint] = Endpoint("203.0.113.11", 3479)
    STUN6_PRIMARY: ClassVar[Endpoint] = Endpoint(f"{PUB_NET6}10", 3478)
    STUN6_ALTERNATE: ClassVar[Endpoint] = Endpoint(f"{PUB_NET6}11", 3479)
    STUN_NAME: ClassVar[str] = "stun.lab.test"  # A and AAAA: STUN_PRIMARY's and STUN6_PRIMARY's addresses
    MAIL_HOST: ClassVar[str] = "203.0.113.10"
    MAIL_NAME: ClassVar[str] = "mail.lab.test"
    SMTPS_PORT: ClassVar[int] = 465
    SUBMISSION_PORT: ClassVar[int] = 587
    IMAPS_PORT: ClassVar[int] = 993
    LMTP_PORT: ClassVar[int] = 24
    HOPS_TO_PEER_NAT: ClassVar[int] = 3
    PUB_IPS: ClassVar[tuple[str, str]] = ("203.0.113.10", "203.0.113.11")
    PUB_IPS6: ClassVar[tuple[str, str]] = (f"{PUB_NET6}10", f"{PUB_NET6}11")
    TURN_REALM: ClassVar[str] = "lab.test"
    TURN_RELAY_PORTS: ClassVar[tuple[int, int]] = (49152, 49407)  # relayed endpoints on 203.0.113.10
    TURNS_PORT: ClassVar[int] = 5349  # TURN over TLS (TCP is on the STUN port)

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"px{secrets.token_hex(3)}-"
        self.tmp: Path | None = None
        self.accounts: dict[str, Account] = {
            name: Account(f"{name}@lab.test", f"{name}@lab.test", f"{name}-{secrets.token_hex(4)}")
            for name in ("local", "remote", "shared")
        }
        self.turn = TurnAccount(self.STUN_PRIMARY, "plexus", f"turn-{secrets.token_hex(4)}", self.TURN_REALM)
        self.modes: dict[str, NatMode] = {"a": "cone", "b": "cone"}
        self.ports: dict[str, str] = {}  # hosts whose NAT maps onto a port range of REMAP_RANGES (remap)
        self.outer: dict[str, str] = {}  # hosts whose NAT maps onto another address than its WAN's (renumber)
        self.readdressed: set[str] = set()  # hosts on their LAN's other address (readdress)
        self.carrier = False  # a's router is behind the carrier NAT (double_nat)
        self.ipv6 = dict.fromkeys(HOSTS, True)  # hosts with their global IPv6 address (set_ipv6)
        self._servers: dict[str, _Server] = {}
        self._wires: dict[str, subprocess.Popen[str]] = {}  # hosts whose WAN link is a delay wire
        self._created: list[str] = []
        self.startup_s = 0.0

    # ---- names and addresses -------------------------------------------------------------------------------
    def netns(self, name: str) -> str:
        if name not in NAMESPACES:
            raise ValueError(f"unknown lab namespace {name!r}; expected one of {', '.join(NAMESPACES)}")
        return self.prefix + name

    def inner_ip(self, host: str) -> str:
        neighbour = _neighbour_ip(host)
        if neighbour is not None:
            return neighbour
        site = _site(host)
        if self.modes[host] == "none":
            return site.public_ip
        return f"{site.lan_net}.{READDRESSED if host in self.readdressed else 2}"

    def inner_ip6(self, host: str) -> str:
        """The host's global IPv6 address (no brackets), also its public one: there is no NAT66. The address
        it has with IPv6 on (set_ipv6)."""
        site = NEIGHBOURS.get(host) or _site(host)
        return f"{site.lan6}{3 + site.neighbours.index(host) if host in NEIGHBOURS else 2}"

    def public_ip(self, host: str) -> str:
        if host in NEIGHBOURS:
            return NEIGHBOURS[host].wan_ip
        if host == "a" and self.carrier:
            return CARRIER_WAN
        site = _site(host)
        return site.public_ip if self.modes[host] == "none" else self.outer.get(host, site.wan_ip)

    @property
    def ca_file(self) -> Path:
        return self._path("ca.pem")

    def _path(self, name: str) -> Path:
        if self.tmp is None:
            raise LabError("the lab is not up")
        return self.tmp / name

    # ---- running things in namespaces --------------------------------------------------------------------
    def ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", self.netns(ns), *args])

    def exec(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.netns(host), *argv], **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(["ip", "netns", "exec", self.netns(host), *argv], **kwargs)

    async def call(self, host: str, factory: Callable[[], Awaitable[T]]) -> T:
        return await netns.call_in_netns(self.netns(host), factory)

    def run_sync(self, host: str, func: Callable[[], T]) -> T:
        """Call a blocking func in a thread inside the host's namespace."""
        return netns.run_in_netns(self.netns(host), func)

    def socket(self, host: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> socket.socket:
        return netns.socket_in_netns(self.netns(host), family, type)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        if self.tmp is not None:
            raise LabError(f"lab {self.prefix} is already up")
        started = time.monotonic()
        atexit.register(self.down)
        try:
            self._register()
            self._build_network()
            self._start_servers()
            for host in HOSTS:
                self._wait_for_ipv6(host)
        except BaseException:
            self.down()
            raise
        self.startup_s = time.monotonic() - started

    def down(self) -> None:
        """Stop servers, delete namespaces and files; safe to call twice or after a failed up()."""
        atexit.unregister(self.down)
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        self._servers.clear()
        for relay in self._wires.values():
            with contextlib.suppress(Exception):
                stop_process(relay)
        self._wires.clear()
        for name in reversed(self._created):
            _kill_namespace(name)
        self._created.clear()
        for host in HOSTS:
            shutil.rmtree(NETNS_ETC / self.netns(host), ignore_errors=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        with contextlib.suppress(OSError):
            (REGISTRY / f"{self.prefix}json").unlink()

    def _register(self) -> None:
        # Written before any namespace exists, so `clean` can tell a crashed lab (owner dead) from a live one.
        self.tmp = Path(tempfile.mkdtemp(prefix=f"plexus-lab-{self.prefix}"))
        self.tmp.chmod(0o755)  # Dovecot's unprivileged processes need to traverse it
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / f"{self.prefix}json").write_text(json.dumps({"owner": os.getpid(), "tmp": str(self.tmp)}))
        # The machine's own lines stay (its hostname may be there and nowhere else, with no DNS in the lab)
        hosts = Path("/etc/hosts").read_text().rstrip("\n") + (
            f"\n# the plexus lab {self.prefix}\n"
            f"{self.PUB_IPS[0]} {self.STUN_NAME} {self.MAIL_NAME}\n{self.PUB_IPS6[0]} {self.STUN_NAME}\n"
        )
        for host in HOSTS:
            folder = NETNS_ETC / self.netns(host)
            folder.mkdir(parents=True)
            (folder / "hosts").write_text(hosts)

    def _build_network(self) -> None:
        for name in NAMESPACES:
            run(["ip", "netns", "add", self.netns(name)])
            self._created.append(self.netns(name))
            self.ip(name, "link", "set", "lo", "up")
            # Before any interface exists, so that every address, link-local ones too, is usable at once
            self._sysctl(name, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                         "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")  # fmt: skip
        for router in ("nat-a", "cgn", "nat-b", "inet"):
            self._sysctl(router, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # pub answers every probe of _wait_for_ipv6 (ICMPv6 errors are otherwise limited to one a second)
        self._sysctl("pub", "net.ipv6.icmp.ratelimit=0")
        for host, site in SITES.items():
            self._lan(f"nat-{host}", (host, *site.neighbours))
        self._veth("nat-a", "wan", "inet", "nat-a")
        self._veth("nat-b", "wan", "inet", "nat-b")
        self._veth("pub", "eth0", "inet", "pub")
        for host, site in SITES.items():
            router = f"nat-{host}"
            self.ip(router, "addr", "add", f"{site.lan_net}.1/24", "dev", "lan")
            self.ip(router, "addr", "add", f"{site.public_gw}/27", "dev", "lan")
            self.ip(router, "addr", "add", f"{site.lan6}1/64", "dev", "lan", "nodad")
            self._address_wan(host)
            self._set_host_address(host)
            for neighbour in site.neighbours:
                self.ip(neighbour, "addr", "add", f"{_neighbour_ip(neighbour)}/24", "dev", "eth0")
                self.ip(neighbour, "route", "add", "default", "via", f"{site.lan_net}.1")
            for lan_host in (host, *site.neighbours):
                self._address_host6(lan_host)
            run(
                ["ip", "netns", "exec", self.netns(router), "nft", "-f", "-"],
                input=_NFT_COUNTER + _NFT_FIREWALL6,
            )
            self._apply_nat(host)
        self.ip("inet", "addr", "add", "203.0.113.1/24", "dev", "pub")
        self.ip("inet", "addr", "add", f"{PUB_NET6}1/64", "dev", "pub", "nodad")
        for ip in self.PUB_IPS:
            self.ip("pub", "addr", "add", f"{ip}/24", "dev", "eth0")
        for ip in self.PUB_IPS6:
            self.ip("pub", "addr", "add", f"{ip}/64", "dev", "eth0", "nodad")
        self.ip("pub", "route", "add", "default", "via", "203.0.113.1")
        self.ip("pub", "-6", "route", "add", "default", "via", f"{PUB_NET6}1")

    def _sysctl(self, ns: str, *settings: str) -> None:
        run(["ip", "netns", "exec", self.netns(ns), "sysctl", "-q", "-w", *settings])

    def _veth(self, ns1: str, name1: str, ns2: str, name2: str) -> None:
        run(["ip", "link", "add", name1, "netns", self.netns(ns1), "type", "veth",
             "peer", "name", name2, "netns", self.netns(ns2)])  # fmt: skip
        self.ip(ns1, "link", "set", name1, "up")
        self.ip(ns2, "link", "set", name2, "up")

    def _lan(self, router: str, hosts: Sequence[str]) -> None:
        """The router's "lan": a veth to its one host, or a bridge joining several (b's LAN has c too)."""
        if len(hosts) == 1:
            self._veth(hosts[0], "eth0", router, "lan")
            return
        self.ip(router, "link", "add", "lan", "type", "bridge")
        self.ip(router, "link", "set", "lan", "up")
        for host in hosts:
            self._veth(host, "eth0", router, f"lan-{host}")
            self.ip(router, "link", "set", f"lan-{host}", "master", "lan")

    def _address_wan(self, host: str) -> None:
        """Addresses and routes of the link between the host's NAT router and inet (a veth or a wire)."""
        site, router = SITES[host], f"nat-{host}"
        self.ip(router, "addr", "add", f"{site.wan_ip}/30", "dev", "wan")
        self.ip(router, "route", "add", "default", "via", site.inet_ip)
        self.ip("inet", "addr", "add", f"{site.inet_ip}/30", "dev", router)
        self.ip("inet", "route", "add", f"{site.public_net}/27", "via", site.wan_ip)
        self._address_wan6(host, f"nat-{host}")

    def _address_wan6(self, host: str, router: str) -> None:
        """The IPv6 side of the link between inet and `router`, the site's home router or the carrier NAT in
        front of it, which inet routes the site's /64 to."""
        site = SITES[host]
        self.ip(router, "addr", "add", f"{site.wan6}2/64", "dev", "wan", "nodad")
        self.ip(router, "-6", "route", "add", "default", "via", f"{site.wan6}1")
        self.ip("inet", "addr", "add", f"{site.wan6}1/64", "dev", f"nat-{host}", "nodad")
        self.ip("inet", "-6", "route", "add", f"{site.lan6}/64", "via", f"{site.wan6}2")

    def _address_host6(self, host: str) -> None:
        site = NEIGHBOURS.get(host) or SITES[host]
        self.ip(host, "addr", "add", f"{self.inner_ip6(host)}/64", "dev", "eth0", "nodad")
        self.ip(host, "-6", "route", "add", "default", "via", f"{site.lan6}1")

    def _set_host_address(self, host: str) -> None:
        site = SITES[host]
        public = self.modes[host] == "none"
        self.ip(host, "-4", "addr", "flush", "dev", "eth0")
        self.ip(host, "addr", "add", f"{self.inner_ip(host)}/{27 if public else 24}", "dev", "eth0")
        self.ip(host, "route", "replace", "default", "via", site.public_gw if public else f"{site.lan_net}.1")

    def _apply_nat(self, host: str, flush: bool = True) -> None:
        router = self.netns(f"nat-{host}")
        ruleset = nft_ruleset(
            self.modes[host], f"{SITES[host].lan_net}.2", self.ports.get(host), self.outer.get(host)
        )
        run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=ruleset)
        if flush:  # conntrack -F exits 1 when the table was already empty
            run(["ip", "netns", "exec", router, "conntrack", "-F"], check=False)

    # ---- NAT and links -----------------------------------------------------------------------------------
    def set_nat(self, host: str, mode: str, flush: bool = True) -> None:
        """Switch the host's NAT router to mode; the host's inner address changes on entering/leaving none.
        `flush` False: the mappings the NAT has stay (the flows going on, as a router reconfigured in place
        keeps them); new flows get the new mode's."""
        _site(host)
        if mode not in NAT_MODES:
            raise ValueError(f"unknown NAT mode {mode!r}; expected one of {', '.join(NAT_MODES)}")
        was_public = self.modes[host] == "none"
        self.modes[host] = mode
        if was_public != (mode == "none"):
            self._set_host_address(host)
        self._apply_nat(host, flush)

    def remap(self, host: str) -> str:
        """The host's NAT maps every flow anew, onto new outer ports, as a NAT that forgot its mappings (or
        restarted) does: its masquerade takes the next range of REMAP_RANGES and its conntrack table is
        flushed. The host's next packets get new mappings; what comes to the old ones is dropped. Returns the
        range now in use."""
        _site(host)
        if self.modes[host] == "none":
            raise LabError(f"{host} is in NAT mode none: it has no mappings to remap")
        current = self.ports.get(host)
        following = 0 if current is None else REMAP_RANGES.index(current) + 1
        self.ports[host] = REMAP_RANGES[following % len(REMAP_RANGES)]
        self._apply_nat(host)
        return self.ports[host]

    def readdress(self, host: str, moved: bool = True) -> str:
        """The host's own address changes, as a laptop's does from Wi-Fi to tethering: a new address on its
        LAN (.12), the old one (.2) removed, the default route kept. Its sockets bound to every address send
        from the new one, which its NAT maps anew; one bound to the old address can send no more. `moved`
        False: back. Returns the host's address now."""
        site = _site(host)
        if moved == (host in self.readdressed):
            return self.inner_ip(host)
        if self.modes[host] == "none":
            raise LabError(f"{host} is in NAT mode none: its address is the public one")
        old = self.inner_ip(host)
        if moved:
            self.readdressed.add(host)
        else:
            self.readdressed.discard(host)
        new = self.inner_ip(host)
        # Deleting a primary address deletes its secondaries too, unless they are promoted.
        self.exec(host, ["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"], check=True)
        self.ip(host, "addr", "add", f"{new}/24", "dev", "eth0")
        self.ip(host, "addr", "del", f"{old}/24", "dev", "eth0")
        self.ip(host, "route", "replace", "default", "via", f"{site.lan_net}.1")
        return new

    def expire_stun_flows(self, host: str, port: int) -> None:
        """The host's NAT forgets the mappings of the host's UDP port `port` toward the STUN server (its
        primary and alternate ports), as a NAT does once they have been idle for its UDP timeout (30 s to
        3 min): the port's next STUN request gets a mapping of the NAT's current mode."""
        _site(host)
        router = self.netns(f"nat-{host}")
        for server in (self.STUN_PRIMARY, self.STUN_ALTERNATE):
            run(
                [
                    "ip",
                    "netns",
                    "exec",
                    router,
                    "conntrack",
                    "-D",
                    "-p",
                    "udp",
                    "--sport",
                    str(port),
                    "--dport",
                    str(server.port),
                ],
                check=False,
            )  # fmt: skip  (exits 1 when none matched)

    def renumber(self, host: str, renumbered: bool = True) -> str:
        """The host's NAT maps every flow anew onto another outer address, as after a new DHCP lease from
        the ISP (or a laptop's move to another network): an address of the site's public /27 (which inet
        routes to the router) and its conntrack table flushed; `renumbered` False: back to the WAN address.
        Returns the outer address now in use."""
        site = _site(host)
        if self.modes[host] == "none":
            raise LabError(f"{host} is in NAT mode none: it has no outer address to change")
        router = self.netns(f"nat-{host}")
        address = str(ipaddress.ip_address(site.public_net) + RENUMBERED_OFFSET)
        if renumbered and host not in self.outer:
            run(["ip", "netns", "exec", router, "ip", "addr", "add", f"{address}/32", "dev", "wan"])
            self.outer[host] = address
        elif not renumbered and host in self.outer:
            del self.outer[host]
            run(["ip", "netns", "exec", router, "ip", "addr", "del", f"{address}/32", "dev", "wan"])
        self._apply_nat(host)
        return self.public_ip(host)

    def set_link(self, host: str, delay_ms: float = 0, loss_pct: float = 0) -> None:
        """Degrade the host's WAN link: loss_pct each way (nftables), delay_ms each way.

        Loss uses nftables because some kernels (this lab's CI VM among them) have no sch_netem. Delay uses tc
        netem where the kernel has it, else a delay wire (tests/lab/wire.py) in place of the WAN veth.
        """
        _site(host)
        router = self.netns(f"nat-{host}")
        run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=_nft_loss(loss_pct))
        if self.netem_available:
            for ns, dev in ((router, "wan"), (self.netns("inet"), f"nat-{host}")):
                if delay_ms:
                    run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                         "netem", "delay", f"{delay_ms}ms"])  # fmt: skip
                else:
                    run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            return
        old = self._wires.pop(host, None)
        if old is None and not delay_ms:
            return  # the plain veth is in place already
        if host == "a" and self.carrier:
            raise LabError("no delay wire behind the carrier NAT (this kernel has no netem)")
        if old is None:
            self.ip(f"nat-{host}", "link", "del", "wan")  # takes inet's end with it
        else:
            stop_process(old)  # its taps vanish with it
        if delay_ms:
            try:
                self._wires[host] = wire.start(router, "wan", self.netns("inet"), f"nat-{host}", delay_ms)
            except OSError as error:
                raise LabError(str(error)) from error
        else:
            self._veth(f"nat-{host}", "wan", "inet", f"nat-{host}")
        self._address_wan(host)

    def double_nat(self, on: bool = True) -> None:
        """Put a's home router behind the carrier NAT (cgn), or back on inet directly. The carrier's uplink is
        inet's "nat-a" and nat-a's uplink its "wan" either way, so separate, block_udp and netem delays apply
        unchanged."""
        if on == self.carrier:
            return
        if "a" in self._wires:
            raise LabError("a's WAN link is a delay wire; clear the delay before switching the carrier NAT")
        if on:
            self.ip("nat-a", "link", "del", "wan")  # takes inet's end and its routes with it
            self._veth("nat-a", "wan", "cgn", "lan")
            self._veth("cgn", "wan", "inet", "nat-a")
            self.ip("nat-a", "addr", "add", f"{CARRIER_INSIDE}.2/30", "dev", "wan")
            self.ip("nat-a", "route", "add", "default", "via", f"{CARRIER_INSIDE}.1")
            self.ip("cgn", "addr", "add", f"{CARRIER_INSIDE}.1/30", "dev", "lan")
            self.ip("cgn", "addr", "add", f"{CARRIER_WAN}/30", "dev", "wan")
            self.ip("cgn", "route", "add", "default", "via", CARRIER_UPLINK)
            # a in mode "none" has an address of its own, which the carrier masquerades too
            self.ip("cgn", "route", "add", f"{SITES['a'].public_net}/27", "via", f"{CARRIER_INSIDE}.2")
            self.ip("inet", "addr", "add", f"{CARRIER_UPLINK}/30", "dev", "nat-a")
            run(["ip", "netns", "exec", self.netns("cgn"), "nft", "-f", "-"], input=nft_ruleset("cone", ""))
            self.ip("nat-a", "addr", "add", f"{CARRIER_INSIDE6}2/64", "dev", "wan", "nodad")
            self.ip("nat-a", "-6", "route", "add", "default", "via", f"{CARRIER_INSIDE6}1")
            self.ip("cgn", "addr", "add", f"{CARRIER_INSIDE6}1/64", "dev", "lan", "nodad")
            self.ip("cgn", "-6", "route", "add", f"{SITES['a'].lan6}/64", "via", f"{CARRIER_INSIDE6}2")
            self._address_wan6("a", "cgn")
        else:
            self.ip("cgn", "link", "del", "lan")
            self.ip("cgn", "link", "del", "wan")
            self._veth("nat-a", "wan", "inet", "nat-a")
            self._address_wan("a")
        self.carrier = on
        self._apply_nat("a")  # its conntrack entries name the WAN address it had

    @functools.cached_property
    def netem_available(self) -> bool:
        probe = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        if run(["ip", "netns", "exec", self.netns("pub"), *probe], check=False).returncode != 0:
            return False
        run(
            ["ip", "netns", "exec", self.netns("pub"), "tc", "qdisc", "del", "dev", "lo", "root"], check=False
        )
        return True

    def wan_udp_count(self, host: str) -> int:
        _site(host)
        router = self.netns(f"nat-{host}")
        out = run(
            ["ip", "netns", "exec", router, "nft", "-j", "list", "counter", "ip", "plexus_count", "wan_udp"]
        )
        for item in json.loads(out.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"no wan_udp counter in {router}")

    def set_ipv6(self, host: str, on: bool = True) -> None:
        """Give the host its global IPv6 address and default route back, or take both away: a network with
        IPv4 only (its link-local address stays, as on any Linux host). On again, it waits until the host
        reaches pub over IPv6."""
        if host not in HOSTS:
            raise ValueError(f"unknown lab host {host!r}; expected one of {', '.join(HOSTS)}")
        if on == self.ipv6[host]:
            return
        if on:
            self._address_host6(host)
            self._wait_for_ipv6(host)
        else:
            self.ip(host, "-6", "route", "del", "default")
            self.ip(host, "addr", "del", f"{self.inner_ip6(host)}/64", "dev", "eth0")
        self.ipv6[host] = on

    def separate(self, on: bool = True) -> None:
        """A firewall at the internet router that drops UDP between the two sites, so that no direct path can
        work, while both still reach the public servers (STUN, TURN, mail)."""
        rules = "".join(
            f'    iifname "nat-{x}" oifname "nat-{y}" meta l4proto udp drop\n'
            for x, y in (("a", "b"), ("b", "a"))
        )
        self._forward_filter("inet", "separate", rules if on else None)

    def block_udp(self, host: str, on: bool = True) -> None:
        """The host's network lets no UDP out (a hotel's, an office's): its router drops every UDP packet it
        would forward from the LAN; TCP (mail, TURN over TCP or TLS) passes."""
        _site(host)
        self._forward_filter(
            f"nat-{host}", "blockudp", '    iifname "lan" meta l4proto udp drop\n' if on else None
        )

    def _forward_filter(self, ns: str, table: str, rules: str | None) -> None:
        """A table of forward rules in `ns` replaced by `rules` (None: removed)."""
        netns = self.netns(ns)
        run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", table], check=False)
        if rules is not None:
            chain = "    type filter hook forward priority 0; policy accept;\n" + rules
            ruleset = f"table inet {table} {{\n  chain forward {{\n" + chain + "  }\n}\n"
            run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=ruleset)

    def reset(self) -> None:
        """Back to the start: both NATs cone on the hosts' own ports (no remap range), no carrier NAT, clean
        links, no firewall between the sites nor on either, IPv6 on every host, STUN running; fails if a mail
        server died."""
        self.separate(False)
        self.double_nat(False)
        self.ports.clear()
        for host in SITES:
            if host in self.outer:
                self.renumber(host, False)
            self.readdress(host, False)
            self.block_udp(host, False)
            self.set_nat(host, "cone")
            self.set_link(host)
        for host in HOSTS:
            self.set_ipv6(host)
        if not self._servers["stun"].running:
            self.start_stun()
        for server in self._servers.values():
            server.check_running()

    # ---- servers -----------------------------------------------------------------------------------------
    def _start_servers(self) -> None:
        tmp = self._path("")
        make_pki(tmp, [self.MAIL_NAME, self.STUN_NAME], [*self.PUB_IPS, *self.PUB_IPS6])
        self._write_mail_config()
        self._servers["stun"] = _Server("turnserver", self._turnserver_argv(), tmp / "turnserver.log")
        self._servers["dovecot"] = _Server(
            "dovecot", ["dovecot", "-F", "-c", str(tmp / "dovecot.conf")], tmp / "dovecot.log"
        )
        self._servers["smtpd"] = _Server("smtpd", self._smtpd_argv(), tmp / "smtpd.log")
        for server in self._servers.values():
            server.start(self.netns("pub"))
        self._wait_for("stun", self._probe_stun)
        self._wait_for("dovecot", self._probe_imaps)
        self._wait_for("smtpd", self._probe_smtp)

    def stop_stun(self) -> None:
        self._servers["stun"].stop()

    def start_stun(self) -> None:
        self._servers["stun"].stop()  # reaps a turnserver that died on its own
        self._servers["stun"].start(self.netns("pub"))
        self._wait_for("stun", self._probe_stun)

    def _turnserver_argv(self) -> list[str]:
        """coturn: STUN (RFC 5780) on both addresses of each family, and TURN over UDP, TCP (the same port)
        and TLS (TURNS_PORT, the lab CA's server certificate) with long-term credentials, over IPv4 and IPv6.

        Plain STUN binding requests need no credentials. coturn pairs the two listening addresses of a family
        for RFC 5780, so the IPv6 alternate is the second IPv6 address. Relayed endpoints are on the primary
        IPv4 address only: an allocation over IPv6 gets one there too (RFC 6156's default family, coturn's
        --allocation-default-address-family ipv4); with no IPv6 relay address, relays reach IPv4 peers
        only, so the allowed peer ranges are IPv4's. coturn refuses some peer ranges by default; the lab's
        hosts (198.51.100.0/24) and servers (203.0.113.0/24) are allowed explicitly, so a change of that
        default cannot break the lab.
        """
        listen = [arg for ip in (*self.PUB_IPS, *self.PUB_IPS6) for arg in ("--listening-ip", ip)]
        return ["turnserver", "-n", *listen,
                "--listening-port", str(self.STUN_PRIMARY.port),
                "--alt-listening-port", str(self.STUN_ALTERNATE.port),
                "--relay-ip", self.PUB_IPS[0],
                "--min-port", str(self.TURN_RELAY_PORTS[0]), "--max-port", str(self.TURN_RELAY_PORTS[1]),
                "--lt-cred-mech", "--realm", self.turn.realm,
                "--user", f"{self.turn.user}:{self.turn.password}",
                "--allowed-peer-ip", "198.51.100.0-198.51.100.255",
                "--allowed-peer-ip", "203.0.113.0-203.0.113.255",
                "--tls-listening-port", str(self.TURNS_PORT),
                "--cert", str(self._path("server.pem")), "--pkey", str(self._path("server.key")),
                "--no-tcp-relay", "--no-dtls", "--no-cli", "--log-file", "stdout", "--simple-log",
                "--pidfile", str(self._path("turnserver.pid")),
                "--userdb", str(self._path("turndb"))]  # fmt: skip

    def _smtpd_argv(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("smtpd.py")), "--host", "0.0.0.0",
                "--cert", str(self._path("server.pem")), "--key", str(self._path("server.key")),
                "--accounts", str(self._path("accounts.json")),
                "--lmtp", f"127.0.0.1:{self.LMTP_PORT}"]  # fmt: skip

    def _write_mail_config(self) -> None:
        tmp = self._path("")
        mail = tmp / "mail"
        mail.mkdir()
        os.chown(mail, NOBODY, NOBODY)
        passwd = tmp / "passwd"
        passwd.write_text("".join(f"{a.login}:{{PLAIN}}{a.password}::::::\n" for a in self.accounts.values()))
        # Read by the auth process, which runs as the dovecot user
        os.chown(passwd, 0, grp.getgrnam("dovecot").gr_gid)
        passwd.chmod(0o640)
        accounts = tmp / "accounts.json"
        accounts.write_text(json.dumps({a.login: a.password for a in self.accounts.values()}))
        accounts.chmod(0o600)
        (tmp / "dovecot.conf").write_text(_DOVECOT_CONF.format(tmp=tmp, uid=NOBODY, lmtp_port=self.LMTP_PORT))

    def _wait_for(self, name: str, probe: Callable[[], None]) -> None:
        server = self._servers[name]
        error = self._retry("inet", probe, server.check_running)
        if error is not None:
            raise LabError(
                f"{server.name} did not answer within {SERVER_WAIT_S:.0f} s ({error}).\n{server.log_tail()}"
            )

    def _wait_for_ipv6(self, host: str) -> None:
        """Until the host reaches pub over IPv6: neighbour discovery and routes work, no sleep guessed."""
        error = self._retry(host, self._probe_ipv6)
        if error is not None:
            raise LabError(f"host {host} did not reach pub over IPv6 within {SERVER_WAIT_S:.0f} s ({error})")

    def _retry(
        self, ns: str, probe: Callable[[], None], check: Callable[[], None] = lambda: None
    ) -> Exception | None:
        """Run probe in the namespace until it passes (None) or SERVER_WAIT_S is over (its last error); check
        runs before each attempt and may give up by raising."""
        deadline = time.monotonic() + SERVER_WAIT_S
        error: Exception | None = None
        while time.monotonic() < deadline:
            check()
            try:
                self.run_sync(ns, probe)
                return None
            except (OSError, LabError, ssl.SSLError) as exc:
                error = exc
                time.sleep(0.1)
        return error

    def _probe_stun(self) -> None:
        for server in (self.STUN_PRIMARY, self.STUN6_PRIMARY):
            with socket.socket(
                socket.AF_INET6 if ":" in server.host else socket.AF_INET, socket.SOCK_DGRAM
            ) as sock:
                sock.settimeout(0.3)
                request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
                sock.sendto(bytes(request), tuple(server))
                reply = stun.parse_message(sock.recv(2048))
                if (
                    reply.transaction_id != request.transaction_id
                    or "XOR-MAPPED-ADDRESS" not in reply.attributes
                ):
                    raise LabError(f"unexpected STUN reply {reply}")

    def _probe_ipv6(self) -> None:
        """A round trip to pub over IPv6, coturn or not: a datagram to a port where nothing listens comes back
        as ICMPv6 port unreachable, which the socket raises as ConnectionRefusedError."""
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            sock.connect((self.PUB_IPS6[0], DISCARD_PORT))
            sock.send(b"probe")
            try:
                sock.recv(16)
            except ConnectionRefusedError:
                return
            raise LabError(f"something answers on [{self.PUB_IPS6[0]}]:{DISCARD_PORT}")

    def _tls_client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _greeting(self, port: int, *, tls: bool) -> bytes:
        with socket.create_connection((self.MAIL_HOST, port), timeout=2) as raw:
            if not tls:
                return raw.recv(512)
            with self._tls_client().wrap_socket(raw, server_hostname=self.MAIL_HOST) as conn:
                return conn.recv(512)

    def _probe_imaps(self) -> None:
        if not self._greeting(self.IMAPS_PORT, tls=True).startswith(b"* OK"):
            raise LabError("IMAPS greeting is not * OK")

    def _probe_smtp(self) -> None:
        for port, tls in ((self.SMTPS_PORT, True), (self.SUBMISSION_PORT, False)):
            if not self._greeting(port, tls=tls).startswith(b"220"):
                raise LabError(f"SMTP greeting on port {port} is not 220")

    def describe(self) -> str:
        lines = ["namespaces:"]
        lines += [f"  {name:6} {self.netns(name)}" for name in NAMESPACES]
        lines += [
            f"host a: inner {self.inner_ip('a')}, public {self.public_ip('a')} (NAT {self.modes['a']}"
            + (f", behind the carrier NAT: nat-a's WAN {CARRIER_INSIDE}.2)" if self.carrier else ")"),
            f"host b: inner {self.inner_ip('b')}, public {self.public_ip('b')} (NAT {self.modes['b']})",
            f"host c: inner {self.inner_ip('c')}, on b's LAN behind the same NAT, which does not hairpin",
            f"IPv6 (no NAT66, stateful firewalls): a {self.inner_ip6('a')}, b {self.inner_ip6('b')}, "
            f"c {self.inner_ip6('c')}; pub {self.PUB_IPS6[0]}, {self.PUB_IPS6[1]}",
            f"STUN: {self.STUN_PRIMARY} and {self.STUN_ALTERNATE} (RFC 5780); on IPv6 {self.STUN6_PRIMARY}"
            f" and {self.STUN6_ALTERNATE}; {self.STUN_NAME} has both families (hosts' /etc/netns files)",
            f"TURN: {self.turn.server} (UDP) and {self.STUN6_PRIMARY}, user {self.turn.user} / "
            f"{self.turn.password}, realm {self.turn.realm}, relayed ports "
            f"{self.PUB_IPS[0]}:{self.TURN_RELAY_PORTS[0]}-{self.TURN_RELAY_PORTS[1]}",
            f"mail: SMTPS {self.MAIL_HOST}:{self.SMTPS_PORT}, submission :{self.SUBMISSION_PORT} (STARTTLS), "
            f"IMAPS :{self.IMAPS_PORT}; CA {self.ca_file}",
            "accounts:",
        ]
        lines += [f"  {name:7} {a.login} / {a.password}" for name, a in self.accounts.items()]
        lines.append(f"example: ip netns exec {self.netns('a')} bash")
        return "\n".join(lines)


_DOVECOT_CONF = """\
# generated by tests/lab/lab.py for one lab instance
base_dir = {tmp}/dovecot-run
state_dir = {tmp}/dovecot-state
instance_name = dovecot-lab-{tmp.name}
log_path = {tmp}/dovecot.log
protocols = imap lmtp
listen = *
ssl = required
ssl_cert = <{tmp}/server.pem
ssl_key = <{tmp}/server.key
ssl_dh = </usr/share/dovecot/dh.pem
auth_mechanisms = plain login
disable_plaintext_auth = yes
auth_verbose = yes
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
postmaster_address = postmaster@lab.test
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {tmp}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={tmp}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 993
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
"""


def _kill_namespace(name: str) -> None:
    """Kill every process still inside the namespace (never this one), then delete it."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in {int(p) for p in pids} - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


def clean_stale() -> list[str]:
    """Remove namespaces, processes and files of labs whose owner process is gone; return what was removed."""
    removed: list[str] = []
    owners: dict[str, int] = {}
    tmps: dict[str, str] = {}
    if REGISTRY.is_dir():
        for entry in REGISTRY.glob("px*-json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(entry.read_text())
                prefix = entry.name.removesuffix("json")
                owners[prefix], tmps[prefix] = int(data["owner"]), str(data["tmp"])
    for name in _namespaces():
        match = PREFIX_RE.match(name)
        if match is None:
            continue
        owner = owners.get(match.group(0))
        if owner is not None and _alive(owner):
            continue
        _kill_namespace(name)
        removed.append(name)
    for folder in NETNS_ETC.glob("px*-*"):
        match = PREFIX_RE.match(folder.name)
        owner = None if match is None else owners.get(match.group(0))
        if match is not None and (owner is None or not _alive(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    for prefix, owner in owners.items():
        if not _alive(owner):
            shutil.rmtree(tmps[prefix], ignore_errors=True)
            with contextlib.suppress(OSError):
                (REGISTRY / f"{prefix}json").unlink()
            removed.append(tmps[prefix])
    return removed


def _namespaces() -> Iterator[str]:
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        if line.strip():
            yield line.split()[0]
