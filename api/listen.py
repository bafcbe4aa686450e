"""Where this process actually listens: read from the kernel's socket tables, not from a setting.

`uvicorn api.app:app --host 0.0.0.0` listens on every interface whatever NEWSLORA_API_HOST says, so the
API asks the kernel: the TCP sockets in LISTEN state that this process holds (Linux `/proc/self/fd`
matched against `/proc/net/tcp` and `/proc/net/tcp6`). A wildcard (`0.0.0.0`, `::`) or any address that
is not loopback means the API is reachable from elsewhere and must not serve without tokens.

Where `/proc` is not there (not Linux), `listening_addresses` returns None and the caller falls back to
the configured host.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

LISTEN = "0A"  # the TCP state code of a listening socket in /proc/net/tcp*


def _own_socket_inodes(proc: Path) -> set[str]:
    inodes = set()
    for fd in (proc / "self" / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # the fd closed while we looked
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _address(hex_addr: str) -> str:
    """/proc/net/tcp's little-endian hex address -> text ('0100007F' -> '127.0.0.1')."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = struct.unpack("<4I", raw)  # IPv6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))


def listening_addresses(proc: Path = Path("/proc")) -> list[tuple[str, int]] | None:
    """(address, port) of every TCP socket this process listens on, or None where /proc cannot tell."""
    try:
        inodes = _own_socket_inodes(proc)
    except OSError:
        return None
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "self" / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != LISTEN or f[9] not in inodes:
                continue
            addr, port = f[1].split(":")
            out.append((_address(addr), int(port, 16)))
    return out


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach ('' and wildcards are NOT loopback)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def beyond_loopback(addresses: list[tuple[str, int]]) -> list[str]:
    """The listening addresses (as 'host:port') that other machines can reach."""
    return [f"{a}:{p}" for a, p in addresses if not is_loopback(a)]
