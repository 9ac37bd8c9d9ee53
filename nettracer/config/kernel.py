"""Adjusting the configuration to the running kernel.

Like the classic system-probe tracer (which turns ``CollectIPv6Conns`` off when
``/proc/net/if_inet6`` is missing), a configuration that asks for something this kernel
cannot do is corrected, with a notice, rather than failing later inside a BPF program.
"""

from __future__ import annotations

import os


def ipv6_disabled(proc: str = "/proc") -> str | None:
    """Why IPv6 is unavailable in the current network namespace, or None when it works.

    * ``/proc/sys/net/ipv6`` missing: IPv6 not built in, or ``ipv6.disable=1`` at boot
      (the ``ipv6`` module then registers no sysctls).
    * ``net.ipv6.conf.all.disable_ipv6 = 1``: switched off at run time (per network
      namespace since Linux 2.6.27).
    * ``/proc/net/if_inet6`` missing: what system-probe's ``IsIPv6Enabled`` tests.
    """
    if not os.path.isdir(os.path.join(proc, "sys/net/ipv6")):
        return f"{proc}/sys/net/ipv6 is missing (IPv6 not built in or disabled at boot)"
    try:
        with open(os.path.join(proc, "sys/net/ipv6/conf/all/disable_ipv6")) as f:
            if f.read().strip() == "1":
                return "net.ipv6.conf.all.disable_ipv6 = 1"
    except OSError:
        pass
    if not os.path.exists(os.path.join(proc, "net/if_inet6")):
        return f"{proc}/net/if_inet6 is missing"
    return None
