"""Refuse every network connection that does not go to this machine.

Installed in the test process by ``tests/conftest.py`` and in every Python
subprocess the tests start (``sitecustomize.py`` beside this file is put on
their ``PYTHONPATH``). A blocked attempt raises :class:`BlockedNetworkAccess`,
a ``RuntimeError`` on purpose: libraries that quietly retry or fall back on an
``OSError`` cannot swallow it.
"""

import ipaddress
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class BlockedNetworkAccess(RuntimeError):
    pass


def _is_local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]").split("%")[0]
    if host in _LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def _check(address) -> None:
    if isinstance(address, (str, bytes)):  # AF_UNIX socket path
        return
    if isinstance(address, tuple) and address and not _is_local(address[0]):
        raise BlockedNetworkAccess(f"tests may not reach the network: connection to {address!r} refused")


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _connect(self, address):
    _check(address)
    return _real_connect(self, address)


def _connect_ex(self, address):
    _check(address)
    return _real_connect_ex(self, address)


def _getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local(host):
        raise BlockedNetworkAccess(f"tests may not reach the network: name lookup of {host!r} refused")
    return _real_getaddrinfo(host, *args, **kwargs)


def install() -> None:
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.getaddrinfo = _getaddrinfo
