"""Refuse, and record, every attempt of this Python process to reach a non-loopback address.

On PYTHONPATH with NETWORK_GUARD_LOG=FILE set, Python imports this module at start-up (it is `sitecustomize`) and
the guard is on for the whole interpreter and the processes it forks or spawns with the same environment; each
interpreter that installs it appends its pid and command line to FILE.installed. Tests also load it in-process
and call `install()` / `uninstall()`.

While installed, socket connects and datagram sends to any address but loopback, and name lookups of anything but
loopback names, raise `NetworkGuardError` *before* the real call: no packet, not even a DNS query, leaves. Each
refusal appends one JSON line (pid, call, target, the calling frames) to FILE, or to `attempts` when installed
without a file, so a test can assert there were none. Only Python's socket module is guarded: a C extension that
opens its own sockets is not seen (the toy run's gloo store uses 127.0.0.1).
"""

import ipaddress
import json
import os
import socket
import sys
import traceback

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_original: dict[tuple[object, str], object] = {}
_log_path: str | None = None
attempts: list[dict] = []


class NetworkGuardError(ConnectionRefusedError):
    """A non-loopback network attempt refused by the guard."""


def is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host is None or host == "":
        return True  # a passive lookup or the unspecified address: this machine
    if str(host).lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False  # any other name would need a DNS query
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or address.is_unspecified or bool(mapped and mapped.is_loopback)


def _refuse(call: str, target) -> None:
    record = {"pid": os.getpid(), "call": call, "target": repr(target), "stack": traceback.format_stack(limit=10)[:-2]}
    if _log_path:
        with open(_log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
    else:
        attempts.append(record)
    raise NetworkGuardError(f"network guard: {call} to {target!r} refused (only loopback is allowed)")


def _address_of(call: str, args: tuple):
    if call in ("connect", "connect_ex"):
        return args[0]
    if call == "sendto":
        return args[-1]
    return args[3] if len(args) > 3 else None  # sendmsg(buffers, ancdata, flags, address)


def _guard_address(call: str, method):
    def guarded(self, *args):
        address = _address_of(call, args)
        if self.family in _INET_FAMILIES and address is not None and not is_loopback(address[0]):
            _refuse(call, address)
        return method(self, *args)

    return guarded


def _guard_lookup(call: str, function):
    def guarded(host, *args, **kwargs):
        if not is_loopback(host):
            _refuse(call, host)
        return function(host, *args, **kwargs)

    return guarded


def install(log_path: str | None = None) -> None:
    global _log_path
    if _original:
        return
    _log_path = log_path
    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        _original[(socket.socket, name)] = getattr(socket.socket, name)
        setattr(socket.socket, name, _guard_address(name, getattr(socket.socket, name)))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        _original[(socket, name)] = getattr(socket, name)
        setattr(socket, name, _guard_lookup(name, getattr(socket, name)))
    socket.network_guard_installed = True


def uninstall() -> None:
    for (owner, name), original in _original.items():
        setattr(owner, name, original)
    _original.clear()
    attempts.clear()
    socket.network_guard_installed = False


if os.environ.get("NETWORK_GUARD_LOG"):
    install(os.environ["NETWORK_GUARD_LOG"])
    # Evidence that the guard ran in each interpreter, so that an empty log cannot mean "never installed".
    with open(os.environ["NETWORK_GUARD_LOG"] + ".installed", "a") as installed:
        installed.write(json.dumps({"pid": os.getpid(), "argv": getattr(sys, "orig_argv", [])}) + "\n")
