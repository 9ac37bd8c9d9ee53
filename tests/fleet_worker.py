"""The container's workload in the fleet test: runs inside the test's network namespace
and cgroup and does what stdin asks, one command a line, answering one line each.

``keep``: open a TCP connection over lo and keep both ends open (answers 0);
``tcp B``: one TCP connection carrying B bytes each way, closed (answers 0);
``drops N``: N UDP datagrams to a closed port (answers how many were refused);
``retrans``: the namespace's ``Tcp: RetransSegs`` from /proc/net/snmp.
"""

from __future__ import annotations

import socket
import sys

from test_agent import tcp_exchange, udp_to_closed_port


def retrans_segs() -> int:
    with open("/proc/self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")])


def main() -> None:
    kept: list[socket.socket] = []
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        out = 0
        if cmd == "keep":
            with socket.create_server(("127.0.0.1", 0)) as srv:  # a listener: no connection
                kept.append(socket.create_connection(srv.getsockname()))
                kept.append(srv.accept()[0])
        elif cmd == "tcp":
            tcp_exchange(int(arg))
        elif cmd == "drops":
            out = udp_to_closed_port(int(arg))
        elif cmd == "retrans":
            out = retrans_segs()
        print(out, flush=True)


if __name__ == "__main__":
    main()
