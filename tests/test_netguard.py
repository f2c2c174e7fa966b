import socket
import subprocess
import sys

import pytest
from netguard import BlockedNetworkAccess


def test_outside_connection_is_refused_in_process():
    with pytest.raises(BlockedNetworkAccess, match="may not reach the network"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    with pytest.raises(BlockedNetworkAccess, match="name lookup"):
        socket.getaddrinfo("example.com", 443)


def test_outside_connection_is_refused_in_subprocesses():
    code = "import socket; socket.create_connection(('8.8.8.8', 53), timeout=1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "BlockedNetworkAccess" in proc.stderr


def test_localhost_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()
