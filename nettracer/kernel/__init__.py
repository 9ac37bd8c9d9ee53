"""The running kernel: BTF, kallsyms, tracefs, identity and feature probes."""
