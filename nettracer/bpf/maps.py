"""BPF maps with typed keys and values.

Keys and values are ctypes types (``ctypes.c_uint32`` or a ``ctypes.Structure``
subclass shared with the program builder, so the record is defined once).
Per-CPU maps hold one value per *possible* CPU, each padded to 8 bytes, as
``bpf_map_lookup_elem`` returns them to user space.
"""

from __future__ import annotations

import ctypes
import errno
import functools

from nettracer.bpf import syscall
from nettracer.bpf.fd import FdObject
from nettracer.bpf.syscall import BPF_ANY, BpfSyscallError, Cmd, MapType
from nettracer.errors import NettracerError

TYPE_CHECKING = False  # typing is not imported at run time (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

CType = object  # a ctypes type (simple or Structure)

PERCPU_TYPES = {MapType.PERCPU_ARRAY, MapType.PERCPU_HASH, MapType.LRU_PERCPU_HASH}


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs (``/sys/devices/system/cpu/possible``, e.g. ``0-1``)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def _round8(n: int) -> int:
    return (n + 7) & ~7


class MapFullError(NettracerError):
    """An update failed because the map is full (E2BIG)."""


class Map(FdObject):
    """A BPF map. ``key_type``/``value_type`` are ctypes types.

    ``lookup`` returns a Python int for simple value types and the Structure for
    structured ones; per-CPU maps return a list with one value per possible CPU.
    """

    kind = "map"

    def __init__(
        self,
        map_type: MapType,
        key_type: CType,
        value_type: CType,
        max_entries: int,
        name: str = "",
        flags: int = 0,
    ) -> None:
        self.map_type = MapType(map_type)
        self.key_type = key_type
        self.value_type = value_type
        self.max_entries = max_entries
        self.name = name
        self.key_size = ctypes.sizeof(key_type) if key_type is not None else 0
        self.value_size = ctypes.sizeof(value_type) if value_type is not None else 0
        self.percpu = self.map_type in PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        fd = syscall.map_create(
            self.map_type, self.key_size, self.value_size, max_entries, flags, name
        )
        super().__init__(fd)

    # -- conversion -------------------------------------------------------
    def _key(self, key: Any) -> ctypes.Array:
        buf = ctypes.create_string_buffer(self.key_size)
        obj = key if isinstance(key, ctypes._SimpleCData | ctypes.Structure) else self.key_type(key)
        ctypes.memmove(buf, ctypes.addressof(obj), self.key_size)
        return buf

    def _value_buf(self) -> ctypes.Array:
        size = _round8(self.value_size) * self.ncpus if self.percpu else self.value_size
        return ctypes.create_string_buffer(max(size, 1))

    def _decode_key(self, buf: ctypes.Array | bytes, offset: int = 0) -> Any:
        obj = self.key_type.from_buffer_copy(buf, offset)
        return obj.value if isinstance(obj, ctypes._SimpleCData) else obj

    def _decode_value(self, buf: ctypes.Array | bytes, offset: int = 0) -> Any:
        if self.percpu:
            stride = _round8(self.value_size)
            return [self._decode_one(buf, offset + i * stride) for i in range(self.ncpus)]
        return self._decode_one(buf, offset)

    def _decode_one(self, buf: ctypes.Array | bytes, offset: int) -> Any:
        obj = self.value_type.from_buffer_copy(buf, offset)
        return obj.value if isinstance(obj, ctypes._SimpleCData) else obj

    def _encode_value(self, value: Any) -> ctypes.Array:
        buf = self._value_buf()
        values = value if self.percpu and isinstance(value, list | tuple) else [value]
        stride = _round8(self.value_size)
        for i, v in enumerate(values):
            obj = v if isinstance(v, ctypes._SimpleCData | ctypes.Structure) else self.value_type(v)
            ctypes.memmove(
                ctypes.addressof(buf) + i * stride, ctypes.addressof(obj), self.value_size
            )
        return buf

    # -- element operations ----------------------------------------------
    def lookup(self, key: Any, default: Any = None) -> Any:
        kbuf, vbuf = self._key(key), self._value_buf()
        try:
            syscall.map_elem(Cmd.MAP_LOOKUP_ELEM, self.fd, kbuf, vbuf)
        except BpfSyscallError as exc:
            if exc.errno == errno.ENOENT:
                return default
            raise
        return self._decode_value(vbuf)

    def __getitem__(self, key: Any) -> Any:
        value = self.lookup(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        try:
            syscall.map_elem(
                Cmd.MAP_UPDATE_ELEM, self.fd, self._key(key), self._encode_value(value), flags
            )
        except BpfSyscallError as exc:
            if exc.errno == errno.E2BIG:
                raise MapFullError(
                    f"map {self.name!r} is full ({self.max_entries} entries)"
                ) from None
            raise

    __setitem__ = update

    def delete(self, key: Any) -> bool:
        """Delete ``key``; False when it was not there."""
        try:
            syscall.map_elem(Cmd.MAP_DELETE_ELEM, self.fd, self._key(key), None)
        except BpfSyscallError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def lookup_and_delete(self, key: Any, default: Any = None) -> Any:
        """Atomically read and remove ``key`` (hash maps: Linux 5.14; before, queue and
        stack maps only: :class:`~nettracer.errors.NotSupported`)."""
        kbuf, vbuf = self._key(key), self._value_buf()
        try:
            syscall.map_elem(Cmd.MAP_LOOKUP_AND_DELETE_ELEM, self.fd, kbuf, vbuf)
        except BpfSyscallError as exc:
            if exc.errno == errno.ENOENT:
                return default
            if exc.errno in _NO_BATCH:  # ENOTSUPP (524) from map_lookup_and_delete_elem()
                from nettracer.errors import NotSupported

                raise NotSupported(
                    f"reading and deleting a {self.map_type.name.lower()} map element at once",
                    "5.14",
                ) from None
            raise
        return self._decode_value(vbuf)

    def pop(self, key: Any, default: Any = None) -> Any:
        """Read and remove ``key``: atomically where the kernel can
        (:meth:`lookup_and_delete`), before 5.14 a lookup then a delete (what a program
        adds in between is lost; ``default`` when another deleter won)."""
        from nettracer.errors import NotSupported

        try:
            return self.lookup_and_delete(key, default)
        except NotSupported:
            v = self.lookup(key, _MISSING)
            return v if v is not _MISSING and self.delete(key) else default

    def keys(self) -> Iterator[Any]:
        """Iterate keys with MAP_GET_NEXT_KEY (a key deleted meanwhile restarts the walk)."""
        cur: ctypes.Array | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            try:
                syscall.map_elem(Cmd.MAP_GET_NEXT_KEY, self.fd, cur, nxt)
            except BpfSyscallError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            yield self._decode_key(nxt)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def items(self) -> list[tuple[Any, Any]]:
        """All (key, value) pairs: batch calls where :func:`use_batch_ops` says so (5.6),
        else (or where the map type has none) a walk, one key at a time."""
        if self.map_type not in (MapType.RINGBUF,) and use_batch_ops():
            try:
                return self._batch(Cmd.MAP_LOOKUP_BATCH)
            except BpfSyscallError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
        out = []
        for k in list(self.keys()):
            v = self.lookup(k, _MISSING)
            if v is not _MISSING:
                out.append((k, v))
        return out

    def pop_items(self) -> list[tuple[Any, Any]]:
        """Read and delete every element, each atomically (LOOKUP_AND_DELETE_BATCH, 5.6,
        where :func:`use_batch_ops` says so; else one key at a time with :meth:`pop`)."""
        if use_batch_ops():
            try:
                return self._batch(Cmd.MAP_LOOKUP_AND_DELETE_BATCH)
            except BpfSyscallError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
        out = []
        for k in list(self.keys()):
            v = self.pop(k, _MISSING)
            if v is not _MISSING:
                out.append((k, v))
        return out

    def _batch(self, cmd: Cmd) -> list[tuple[Any, Any]]:
        count = max(1, min(self.max_entries, _BATCH))  # bounded buffers for big maps
        vstride = _round8(self.value_size) * self.ncpus if self.percpu else self.value_size
        keys = ctypes.create_string_buffer(self.key_size * count)
        values = ctypes.create_string_buffer(max(1, vstride * count))
        out_batch = ctypes.create_string_buffer(max(8, self.key_size))
        in_batch: ctypes.Array | None = None
        result: list[tuple[Any, Any]] = []
        while True:
            n, err = syscall.map_batch(cmd, self.fd, in_batch, out_batch, keys, values, count)
            for i in range(n):
                result.append(
                    (
                        self._decode_key(keys, i * self.key_size),
                        self._decode_value(values, i * vstride),
                    )
                )
            if err == errno.ENOENT or n == 0:
                return result
            in_batch = ctypes.create_string_buffer(out_batch.raw, len(out_batch))

    def clear(self) -> None:
        if self.map_type in (MapType.ARRAY, MapType.PERCPU_ARRAY):
            zero = self._value_buf()
            for i in range(self.max_entries):
                syscall.map_elem(Cmd.MAP_UPDATE_ELEM, self.fd, self._key(i), zero, BPF_ANY)
            return
        for k in list(self.keys()):
            self.delete(k)


_MISSING = object()
#: elements per batch call: memory stays bounded however large the map
_BATCH = 512
#: errnos meaning "this kernel or map type has no batch operations" (524 is ENOTSUPP)
_NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, 524}


def _always() -> bool:
    return True


#: asked before each batch walk; :func:`nettracer.kernel.features.configure` makes it
#: "use batch_ops?" (the probe, and ``kernel.without``), asked only when a map is walked
_batch_policy: Callable[[], bool] = _always


def use_batch_ops() -> bool:
    """Whether map walks use the batch commands (``BPF_MAP_LOOKUP_BATCH``, Linux 5.6).
    Until :func:`set_batch_policy` they are tried, and a kernel without them answers
    ``EINVAL`` once per walk."""
    return _batch_policy()


def set_batch_policy(policy: Callable[[], bool]) -> None:
    """Make ``policy`` the answer of :func:`use_batch_ops` (the kernel layer's choice)."""
    global _batch_policy
    _batch_policy = policy


def array(value_type: CType, max_entries: int, name: str = "") -> Map:
    return Map(MapType.ARRAY, ctypes.c_uint32, value_type, max_entries, name)


def percpu_array(value_type: CType, max_entries: int, name: str = "") -> Map:
    return Map(MapType.PERCPU_ARRAY, ctypes.c_uint32, value_type, max_entries, name)


def hash_map(key_type: CType, value_type: CType, max_entries: int, name: str = "") -> Map:
    return Map(MapType.HASH, key_type, value_type, max_entries, name)


def percpu_hash(
    key_type: CType, value_type: CType, max_entries: int, name: str = "", flags: int = 0
) -> Map:
    """A per-CPU hash map; ``flags`` ``BPF_F_NO_PREALLOC`` allocates an entry when its key
    is first inserted instead of all ``max_entries`` at creation (which costs about 1.3
    ms per 1,000 entries on 2 CPUs: one per-CPU allocation each)."""
    return Map(MapType.PERCPU_HASH, key_type, value_type, max_entries, name, flags)


def lru_hash(key_type: CType, value_type: CType, max_entries: int, name: str = "") -> Map:
    return Map(MapType.LRU_HASH, key_type, value_type, max_entries, name)
