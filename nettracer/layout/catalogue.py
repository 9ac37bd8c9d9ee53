"""The field catalogue: every kernel struct field nettracer reads.

Keys are ``struct.member.path`` with the offset counted from the start of
``struct``; anonymous unions/structs are transparent in a path, as in C.
Sizes are the C types' sizes (they do not vary between kernels we support);
offsets never live here: they come from BTF or from the guesser.
"""

from __future__ import annotations

from nettracer.value import Value


class FieldSpec(Value):
    """One catalogue entry.

    ``ctype`` is the C type as written in the kernel, ``points_to`` the struct a
    pointer field points to (``None`` for non-pointers), ``byteorder`` is ``"big"``
    for ``__be16``/``__be32`` network-order fields.
    """

    __slots__ = ("key", "size", "ctype", "points_to", "byteorder")  # noqa: RUF023

    def __init__(
        self,
        key: str,
        size: int,
        ctype: str,
        points_to: str | None = None,
        byteorder: str = "little",
    ) -> None:
        self.key = key
        self.size = size
        self.ctype = ctype
        self.points_to = points_to
        self.byteorder = byteorder

    @property
    def struct(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def path(self) -> str:
        return self.key.split(".", 1)[1]


CATALOGUE: tuple[FieldSpec, ...] = (
    # struct sock_common (include/net/sock.h)
    FieldSpec("sock_common.skc_daddr", 4, "__be32", byteorder="big"),
    FieldSpec("sock_common.skc_rcv_saddr", 4, "__be32", byteorder="big"),
    FieldSpec("sock_common.skc_dport", 2, "__be16", byteorder="big"),
    FieldSpec("sock_common.skc_num", 2, "__u16"),
    FieldSpec("sock_common.skc_family", 2, "unsigned short"),
    FieldSpec("sock_common.skc_state", 1, "volatile unsigned char"),
    # possible_net_t is { struct net *net; } with CONFIG_NET_NS
    FieldSpec("sock_common.skc_net", 8, "possible_net_t", points_to="net"),
    FieldSpec("sock_common.skc_v6_daddr", 16, "struct in6_addr"),
    FieldSpec("sock_common.skc_v6_rcv_saddr", 16, "struct in6_addr"),
    # struct net (include/net/net_namespace.h) -> struct ns_common
    FieldSpec("net.ns.inum", 4, "unsigned int"),
    # struct sock: sk_protocol/sk_type are u16 since Linux 5.6 (bitfields before)
    FieldSpec("sock.sk_protocol", 2, "u16"),
    FieldSpec("sock.sk_type", 2, "u16"),
    # struct tcp_sock (include/linux/tcp.h)
    FieldSpec("tcp_sock.srtt_us", 4, "u32"),
    FieldSpec("tcp_sock.mdev_us", 4, "u32"),
    FieldSpec("tcp_sock.bytes_received", 8, "u64"),
    FieldSpec("tcp_sock.bytes_acked", 8, "u64"),
    FieldSpec("tcp_sock.total_retrans", 4, "u32"),
    FieldSpec("tcp_sock.segs_in", 4, "u32"),
    FieldSpec("tcp_sock.segs_out", 4, "u32"),
    # struct sk_buff (include/linux/skbuff.h)
    FieldSpec("sk_buff.dev", 8, "struct net_device *", points_to="net_device"),
    FieldSpec("sk_buff.len", 4, "unsigned int"),
    FieldSpec("sk_buff.protocol", 2, "__be16", byteorder="big"),
    FieldSpec("sk_buff.head", 8, "unsigned char *"),
    FieldSpec("sk_buff.network_header", 2, "__u16"),
    FieldSpec("sk_buff.transport_header", 2, "__u16"),
    FieldSpec("sk_buff.sk", 8, "struct sock *", points_to="sock"),
    # struct net_device (include/linux/netdevice.h)
    FieldSpec("net_device.name", 16, "char[IFNAMSIZ]"),
    FieldSpec("net_device.ifindex", 4, "int"),
    FieldSpec("net_device.nd_net", 8, "possible_net_t", points_to="net"),
)

BY_KEY: dict[str, FieldSpec] = {f.key: f for f in CATALOGUE}


def spec(key: str) -> FieldSpec:
    """The catalogue entry for ``key``; KeyError names the known keys."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise KeyError(
            f"{key!r} is not in the field catalogue (known: {', '.join(BY_KEY)})"
        ) from None
