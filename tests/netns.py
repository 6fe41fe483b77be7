"""Network namespaces for cross-host tests: each "host" is an ``ip netns`` joined to this machine by a veth pair.

``NetNs`` creates the namespace, a veth pair (host end ``<name>h`` at ``10.77.<n>.1/24``, namespace end at
``10.77.<n>.2/24``), brings both ends and the namespace's loopback up, and removes everything on exit even when
the test failed. Names carry a random suffix, so parallel test runs do not clash. Cutting the link
(:meth:`NetNs.link_down`) is what a host dropping off the network looks like to everyone else.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import uuid


class NetNsUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no CAP_NET_ADMIN, or no ``ip``)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None: they can), found by actually creating and deleting one."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"drover-probe-{uuid.uuid4().hex[:8]}"
    try:
        made = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {exc!r}"
    if made.returncode != 0:
        return f"`ip netns add` failed (root / CAP_NET_ADMIN needed): {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _used_subnets() -> set[int]:
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    used = set()
    for word in out.split():
        if word.startswith("10.77."):
            with contextlib.suppress(ValueError, IndexError):
                used.add(int(word.split(".")[2]))
    return used


class NetNs:
    """One namespace plus veth link; a context manager that tears everything down on exit."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"drover-{tag}"
        self.host_if = f"dv{tag}h"  # interface names: at most 15 characters
        self.ns_if = f"dv{tag}n"
        free = sorted(set(range(1, 255)) - _used_subnets())
        if not free:
            raise NetNsUnavailable("no free 10.77.x.0/24 subnet")
        self.subnet = random.choice(free)
        self.host_ip = f"10.77.{self.subnet}.1"
        self.ns_ip = f"10.77.{self.subnet}.2"

    def __enter__(self) -> NetNs:
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            self.exec_ip("addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
            self.exec_ip("link", "set", self.ns_if, "up")
            self.exec_ip("link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            raise NetNsUnavailable(f"{exc.cmd}: {exc.stderr}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec_ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def link_down(self) -> None:
        """Cut the link: the host end goes down, nothing passes either way."""
        _ip("link", "set", self.host_if, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        """Remove the veth pair (deleting one end removes both) and the namespace; never raises."""
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
