"""The running kernel: BTF, kallsyms, tracefs, identity and feature probes."""

#: where the running kernel's BTF is (Linux 5.4+ with CONFIG_DEBUG_INFO_BTF); here rather
#: than in :mod:`nettracer.kernel.btf`, whose import costs start-up ~10 ms
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
