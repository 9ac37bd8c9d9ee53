"""nettracer: a Linux network tracer in pure Python eBPF (no compiler, no kprobes)."""

__version__ = "0.1.0"
