"""eBPF mechanics with no compiler: instructions, syscalls, maps, programs, links.

Knows nothing about networking. ``syscall`` is the one module that issues raw
system calls (``bpf(2)``, ``perf_event_open(2)``, ``ioctl(2)``, ``mount(2)``,
``setns(2)``, ``unshare(2)``), with ``union bpf_attr``'s members as ctypes structures.
"""
