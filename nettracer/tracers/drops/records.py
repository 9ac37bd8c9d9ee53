"""The records the drop program shares with user space, defined once for the program
builder (:mod:`nettracer.tracers.drops.program`) and the readers (monitor, output)."""

from __future__ import annotations

import ctypes

IFNAMSIZ = 16
#: bytes copied from ``skb->head + skb->network_header`` into each event: enough for
#: an IPv4 header with options (60) or IPv6 with a few extension headers, plus ports
HEADER_BYTES = 128
#: ``DropKey.stack_id`` when no stack was taken (``--stack`` off) or it could not be
STACK_NONE = 0xFFFF


class DropKey(ctypes.Structure):
    """Key of the ``counts`` map: one drop site, reason, device, namespace, protocol, stack.

    ``protocol`` is ``skb->protocol`` as it lies in memory (``__be16``); ``stack_id``
    is the ``BPF_MAP_TYPE_STACK_TRACE`` id (< 65535) or :data:`STACK_NONE`.
    """

    _fields_ = (
        ("location", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("protocol", ctypes.c_uint16),
        ("stack_id", ctypes.c_uint16),
    )


class DevKey(ctypes.Structure):
    """Key of the ``devnames`` side map."""

    _fields_ = (("netns", ctypes.c_uint32), ("ifindex", ctypes.c_uint32))


class DevName(ctypes.Structure):
    """``char name[IFNAMSIZ]`` of ``struct net_device``."""

    _fields_ = (("name", ctypes.c_char * IFNAMSIZ),)


class DropEvent(ctypes.Structure):
    """One event-channel record per dropped packet (``--events``)."""

    _fields_ = (
        ("ts_ns", ctypes.c_uint64),  # bpf_ktime_get_ns(): CLOCK_MONOTONIC
        ("location", ctypes.c_uint64),
        ("pid_tgid", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("len", ctypes.c_uint32),  # skb->len
        ("protocol", ctypes.c_uint16),  # __be16 as in memory
        ("stack_id", ctypes.c_uint16),
        ("network_header", ctypes.c_uint16),
        ("transport_header", ctypes.c_uint16),
        ("header_len", ctypes.c_uint16),  # bytes of header[] that were read, 0 if none
        ("_pad", ctypes.c_uint16),
        ("comm", ctypes.c_char * 16),
        ("devname", ctypes.c_char * IFNAMSIZ),
        ("header", ctypes.c_uint8 * HEADER_BYTES),
    )
