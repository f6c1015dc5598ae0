"""Which processes listen where: /proc/net/tcp and /proc/net/tcp6, matched to processes through
their socket file descriptors (Linux). For tests that prove a service listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # 4 little-endian words
    address = ipaddress.IPv6Address(words)
    return address.ipv4_mapped or address


def listening() -> dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """socket inode -> (address, port) of every TCP socket listening on this machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                found[fields[9]] = (_address(address), int(port, 16))
    return found


def sockets_of(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of every listening socket the processes hold."""
    table, out = listening(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target[len("socket:[") : -1] if target.startswith("socket:[") else ""
            if inode in table:
                address, port = table[inode]
                out.append((pid, command[:120], str(address), port))
    return out


def exposed(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """The listening sockets of `pids` that are not on a loopback address."""
    return [s for s in sockets_of(pids) if not ipaddress.ip_address(s[2]).is_loopback]


def process_tree(roots: set[int]) -> set[int]:
    """`roots` and every process descended from them."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    found = set(roots)
    while more := {p for p, parent in parents.items() if parent in found} - found:
        found |= more
    return found


def in_group(pgid: int) -> set[int]:
    """Every process of a process group (a command started with start_new_session)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                found.add(int(pid))
        except OSError:
            continue
    return found


def marked(mark: str) -> set[int]:
    """Processes whose environment holds `mark` (NAME=value)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(int(pid))
        except OSError:
            continue
    return found
