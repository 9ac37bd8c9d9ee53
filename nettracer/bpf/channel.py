"""Event channels: one record per event from a program to user space, lost ones counted.

An :class:`EventChannel` is the program side (it names its maps and emits the
instructions) and a factory for its :class:`ChannelReader` (the maps and the user
side).  Today's channel is the BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``, Linux 5.8,
:mod:`nettracer.bpf.ringbuf`); a perf event array (``BPF_MAP_TYPE_PERF_EVENT_ARRAY``,
for older kernels) fits behind the same calls: its :meth:`~EventChannel.reserve` would
hand out a per-CPU array slot as scratch and :meth:`~EventChannel.submit` would call
``bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, rec, size)``, which is why
``submit`` takes the context register and the record size.

Program side, a record built in place::

    ch = event_channel("events", "lost")
    p = Program()
    p += mov64(R6, R1)                              # keep ctx: submit needs it
    ch.reserve(p, R7, 32, on_fail="out", scratch_off=-8)
    p += st(8, R7, 0, 42)                           # fill the record
    ch.submit(p, R7, ctx=R6, size=32, scratch_off=-8)

or a record already on the stack: ``ch.output(p, ctx=R6, buf_off=-64, size=32,
done="out", scratch_off=-8)``.  User side::

    with ch.open(size=1 << 20) as reader:           # creates "events" and "lost"
        prog.load(p.insns, maps=reader.maps | other_maps)
        reader.poll(0.5, lambda view: ...)          # memoryview valid during the call
        reader.lost                                 # records that did not fit
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from nettracer.bpf.counters import counted, lookup, lost_counter, lost_inc
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    Program,
    Reg,
    add64,
    call,
    ja,
    jeq,
    jne,
    ld_imm64,
    ld_map_fd,
    mov64,
    st,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.maps import Map
    from nettracer.bpf.perfbuf import PerfBufReader
    from nettracer.bpf.ringbuf import RingBufReader

    _Reader = RingBufReader | PerfBufReader

#: ``bpf_ringbuf_submit``/``_output`` flag: do not wake the reader (it polls on a timer)
BPF_RB_NO_WAKEUP = 1


class EventChannel:
    """A ring buffer named ``map`` in the program, with ``lost`` (per-CPU ``u64`` array,
    index 0) counting the records that did not fit. Every emitter clobbers R0-R5."""

    kind = "ringbuf"

    def __init__(self, map: str = "events", lost: str = "lost") -> None:
        self.map = map
        self.lost = lost

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.map!r}, {self.lost!r})"

    # -- program side --------------------------------------------------------------
    def reserve(self, p: Program, dst: Reg, size: int, on_fail: str, scratch_off: int) -> None:
        """``dst = bpf_ringbuf_reserve(&map, size, 0)``: a record of ``size`` bytes to
        fill; when there is no room, ``lost[0] += 1`` and jump to ``on_fail``.
        ``scratch_off`` is a 4-byte stack slot (the key of ``lost``)."""
        p += [ld_map_fd(R1, self.map), mov64(R2, size), mov64(R3, 0)]
        p += call(Helper.ringbuf_reserve)
        self._reserved(p, dst, on_fail, scratch_off)

    def _reserved(self, p: Program, dst: Reg, on_fail: str, scratch_off: int) -> None:
        """``dst = R0``, the record; when R0 is NULL ``lost[0] += 1`` and ``on_fail``."""
        ok = p.new_label("reserved")
        p += jne(R0, 0, ok)
        lost_inc(p, self.lost, scratch_off)
        p += ja(on_fail)
        p += mov64(dst, R0).at(ok)

    def submit(
        self,
        p: Program,
        rec: Reg,
        *,
        ctx: Reg,
        size: int,
        scratch_off: int,
        wakeup: bool = True,
    ) -> None:
        """Hand the record ``rec`` from :meth:`reserve` to user space
        (``bpf_ringbuf_submit``, which cannot fail). ``ctx`` (the program's context,
        kept in a callee-saved register), ``size`` and ``scratch_off`` are what a perf
        event array needs; ``wakeup=False`` leaves the reader asleep until its timer."""
        del ctx, size, scratch_off  # a ring buffer record knows its size and never fails
        p += [mov64(R1, rec), mov64(R2, 0 if wakeup else BPF_RB_NO_WAKEUP)]
        p += call(Helper.ringbuf_submit)

    def try_output(
        self,
        p: Program,
        *,
        ctx: Reg | None,
        src: Reg,
        size: int,
        ok: str,
        src_off: int = 0,
        wakeup: bool = True,
    ) -> None:
        """Copy the ``size`` bytes at ``src + src_off`` (the stack, a map value) into a
        new record (``bpf_ringbuf_output``) and jump to ``ok``; fall through when there
        was no room (nothing counted: the caller retries, keeps the record elsewhere or
        calls :func:`~nettracer.bpf.counters.lost_inc`). ``ctx`` is what a perf event
        array needs (None: the program did not keep it, a ring buffer does not care)."""
        del ctx
        p += [ld_map_fd(R1, self.map), mov64(R2, src)]
        if src_off:
            p += add64(R2, src_off)
        p += [mov64(R3, size), mov64(R4, 0 if wakeup else BPF_RB_NO_WAKEUP)]
        p += [call(Helper.ringbuf_output), jeq(R0, 0, ok)]

    def output(
        self, p: Program, *, ctx: Reg, buf_off: int, size: int, done: str, scratch_off: int
    ) -> None:
        """Copy the ``size`` bytes at ``fp + buf_off`` into a new record
        (:meth:`try_output`); when there is no room, ``lost[0] += 1``. Jumps to
        ``done`` either way."""
        self.try_output(p, ctx=ctx, src=FP, src_off=buf_off, size=size, ok=done)
        lost_inc(p, self.lost, scratch_off)
        p += ja(done)

    # -- user side -----------------------------------------------------------------
    def open(
        self, size: int = 1 << 20, lost_map: Map | None = None, prefix: str = ""
    ) -> ChannelReader:
        """Create the maps (``lost_map`` when given is shared, not created) and the
        reader. ``size`` is the ring buffer's bytes (rounded up to a page, a power of
        two); ``prefix`` goes before the kernel-side map names (``bpftool map``)."""
        return ChannelReader(self, size, lost_map, prefix)

    def _create(self, size: int, prefix: str) -> tuple[dict[str, Map], _Reader]:
        """The channel's own maps (by program name) and the reader of records."""
        from nettracer.bpf.ringbuf import RingBuf, RingBufReader

        ring = RingBuf(size, prefix + self.map)
        try:
            return {self.map: ring}, RingBufReader(ring)
        except BaseException:
            ring.close()
            raise


class PerfEventChannel(EventChannel):
    """A perf event array named ``map`` (Linux 4.4; :mod:`nettracer.bpf.perfbuf`), the
    channel of kernels without a ring buffer (before 5.8). A record is built in the
    current CPU's slot of a per-CPU array ``<map>_rec`` (one value of ``record_max``
    bytes, at most 32 KiB: programs cannot nest on a CPU through this path, the
    tracepoint runs them with preemption off and each program at most once per CPU at
    a time) and sent with ``bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, rec,
    size)``. Every failed output counts in ``lost`` at once, a full perf buffer
    (``-ENOSPC``) too; the kernel also counts full buffers and reports them in a
    ``PERF_RECORD_LOST``, but only when a later record fits on that CPU, so a burst's
    losses would stay unsaid until the next drop. Before 5.4 the helper returned 0 on
    a full buffer: there the kernel's records are the only count, hence the reader's
    lost is the larger of the two."""

    kind = "perf_event_array"
    #: largest record built in place (the per-CPU array value), unless told otherwise
    RECORD_MAX = 4096
    #: largest per-CPU array value: ``PCPU_MIN_UNIT_SIZE`` (kernel/bpf/arraymap.c)
    PERCPU_VALUE_MAX = 32 << 10

    def __init__(self, map: str = "events", lost: str = "lost", record_max: int = 0) -> None:
        super().__init__(map, lost)
        self.record_max = record_max or self.RECORD_MAX
        if self.record_max > self.PERCPU_VALUE_MAX:
            raise ValueError(
                f"a {self.record_max}-byte record slot exceeds the "
                f"{self.PERCPU_VALUE_MAX}-byte per-CPU array value"
            )

    @property
    def scratch(self) -> str:
        return f"{self.map}_rec"

    def reserve(self, p: Program, dst: Reg, size: int, on_fail: str, scratch_off: int) -> None:
        """``dst`` = this CPU's record slot (``size`` bytes of it are the record)."""
        if size > self.record_max:
            raise ValueError(f"a {size}-byte record does not fit the {self.record_max}-byte slot")
        p += st(4, FP, scratch_off, 0)
        lookup(p, self.scratch, scratch_off)
        self._reserved(p, dst, on_fail, scratch_off)

    def submit(
        self,
        p: Program,
        rec: Reg,
        *,
        ctx: Reg,
        size: int,
        scratch_off: int,
        wakeup: bool = True,
    ) -> None:
        """Send the record ``rec`` (``bpf_perf_event_output``); a full buffer counts as
        lost. ``wakeup`` is the perf event's business (one wakeup per sample)."""
        del wakeup
        sent = p.new_label("sent")
        self.try_output(p, ctx=ctx, src=rec, size=size, ok=sent)
        lost_inc(p, self.lost, scratch_off)  # a full buffer too: see the class docstring
        p.label(sent)

    def try_output(
        self,
        p: Program,
        *,
        ctx: Reg | None,
        src: Reg,
        size: int,
        ok: str,
        src_off: int = 0,
        wakeup: bool = True,
    ) -> None:
        """``bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, src + src_off, size)``
        and jump to ``ok``; fall through when the buffer was full. ``ctx`` is required
        (R1 when a program reloads it from the stack just before)."""
        from nettracer.bpf.perfbuf import BPF_F_CURRENT_CPU

        del wakeup
        if ctx is None:
            raise ValueError("bpf_perf_event_output needs the program's context register")
        p += [mov64(R4, src)]
        if src_off:
            p += add64(R4, src_off)
        if ctx != R1:
            p += mov64(R1, ctx)
        p += [ld_map_fd(R2, self.map), ld_imm64(R3, BPF_F_CURRENT_CPU)]
        p += [mov64(R5, size), call(Helper.perf_event_output), jeq(R0, 0, ok)]

    def _create(self, size: int, prefix: str) -> tuple[dict[str, Map], _Reader]:
        import ctypes

        from nettracer.bpf.maps import percpu_array
        from nettracer.bpf.perfbuf import PerfBufReader, PerfEventArray

        owned: list[Map] = []
        try:
            owned.append(PerfEventArray(prefix + self.map))
            owned.append(percpu_array(ctypes.c_uint8 * self.record_max, 1, prefix + self.scratch))
            reader = PerfBufReader(owned[0], size)  # type: ignore[arg-type]
        except BaseException:
            for m in owned:
                m.close()
            raise
        return {self.map: owned[0], self.scratch: owned[1]}, reader


#: the channel kinds, by the name :func:`event_channel` takes
KINDS: dict[str, type[EventChannel]] = {
    EventChannel.kind: EventChannel,
    PerfEventChannel.kind: PerfEventChannel,
}


def event_channel(
    map: str = "events", lost: str = "lost", kind: str = "ringbuf", record_max: int = 0
) -> EventChannel:
    """The channel of ``kind`` (``"ringbuf"``, or ``"perf_event_array"`` for kernels
    before 5.8) for programs naming ``map`` and ``lost``; ``record_max`` sizes the perf
    event array's record slot (default :attr:`PerfEventChannel.RECORD_MAX`; a ring
    buffer takes any record that fits it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event channel kind {kind!r}")
    if kind == PerfEventChannel.kind:
        return PerfEventChannel(map, lost, record_max)
    return KINDS[kind](map, lost)


def channel_kind(use_ringbuf: bool) -> str:
    """The kind of channel to build: the ring buffer where the kernel has it and it is
    to be used, else the perf event array."""
    return EventChannel.kind if use_ringbuf else PerfEventChannel.kind


class ChannelReader:
    """The maps of an :class:`EventChannel` and the user side reading them.

    ``maps`` maps the program's names to the map objects (pass it to ``prog.load``).
    """

    def __init__(self, channel: EventChannel, size: int, lost_map: Map | None, prefix: str) -> None:
        self.channel = channel
        self._owned: list[Map] = []
        self._reader: _Reader | None = None
        try:
            if lost_map is None:
                lost_map = lost_counter(prefix + channel.lost)
                self._owned.append(lost_map)
            self.lost_map: Map = lost_map
            own, self._reader = channel._create(size, prefix)
            self._owned.extend(own.values())
            self.maps: dict[str, Map] = {**own, channel.lost: lost_map}
        except BaseException:
            self.close()
            raise

    @property
    def lost(self) -> int:
        """Records that did not fit since the start: the sum over CPUs of ``lost[0]``, or
        what the perf buffers reported lost where that is more (kernels before 5.4,
        whose ``bpf_perf_event_output`` did not say the buffer was full)."""
        return max(counted(self.lost_map), self.kernel_lost)

    @property
    def kernel_lost(self) -> int:
        """Records the kernel itself reported lost since the start: the perf buffers'
        ``PERF_RECORD_LOST`` (written once a later record fits on that CPU); 0 for a
        ring buffer."""
        return int(getattr(self._reader, "lost_records", 0))

    @property
    def records(self) -> int:
        """Records handed to callbacks since the start."""
        return self._reader.records if self._reader is not None else 0

    def consume(self, callback: Callable[[memoryview], None]) -> int:
        """Hand every record now waiting to ``callback``; returns how many."""
        assert self._reader is not None, "reader is closed"
        return self._reader.consume(callback)

    def poll(self, timeout_s: float, callback: Callable[[memoryview], None]) -> int:
        """Wait up to ``timeout_s`` for records, then :meth:`consume` them."""
        assert self._reader is not None, "reader is closed"
        return self._reader.poll(timeout_s, callback)

    def close(self) -> None:
        """Stop reading and close the maps this reader created."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for m in reversed(self._owned):
            with contextlib.suppress(OSError):
                m.close()
        self._owned.clear()

    def __enter__(self) -> ChannelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
