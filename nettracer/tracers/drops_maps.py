"""The drop monitor's maps: the records it shares with the kernel, and the ``counts`` map
created early, in a thread, while the command goes on starting.

A per-CPU hash map is preallocated when it is created (kernel/bpf/hashtab.c
``prealloc_init``: one per-CPU allocation per element, so 8192 x the possible CPUs
here): 6-15 ms on a 2-CPU machine, more with more CPUs, all of it in the ``bpf()``
system call, which ctypes makes without holding the GIL.  :func:`create_counts_early`
starts that call in a thread as soon as the command knows it will trace, so that the
kernel allocates while the interpreter imports and reads the configuration;
:class:`nettracer.tracers.drops.DropMonitor` then takes the map (or the error) from
it.  Preallocation stays: per-CPU memory allocated at run time by a tracing program
(``kfree_skb`` may fire inside the allocator) is what the verifier warns about as
unsafe on kernels before 6.1, and refuses with PREEMPT_RT.

This module imports only ctypes and, when creating, :mod:`nettracer.bpf.maps`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.maps import Map

IFNAMSIZ = 16
#: bytes copied from ``skb->head + skb->network_header`` into each event: enough for
#: an IPv4 header with options (60) or IPv6 with a few extension headers, plus ports
HEADER_BYTES = 128
#: keys the ``counts`` map holds (evictions start at half)
MAX_KEYS = 8192


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
    """One ring-buffer record per dropped packet (``--events``)."""

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


def counts_map(max_keys: int = MAX_KEYS) -> Map:
    """The ``counts`` map: :class:`DropKey` -> per-CPU u64, preallocated."""
    from nettracer.bpf import maps

    return maps.percpu_hash(DropKey, ctypes.c_uint64, max_keys, "counts")


def create_counts_early(max_keys: int = MAX_KEYS) -> Callable[[], Map]:
    """Start creating the ``counts`` map in a thread; returns the function that waits for
    it and returns it (or raises what creating it raised: no memory, say).  Not root:
    nothing is started (the command refuses to run), the function creates the map."""
    import os
    import threading

    if os.geteuid() != 0:
        return lambda: counts_map(max_keys)

    done: list[Map | BaseException] = []

    def create() -> None:
        try:
            done.append(counts_map(max_keys))
        except BaseException as exc:  # handed to the caller
            done.append(exc)

    thread = threading.Thread(target=create, name="nettracer-counts-map", daemon=True)
    thread.start()

    def result() -> Map:
        thread.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        return done[0]

    return result
