"""The connection tracer: connections with bytes, retransmits, RTT, state and process.

``records`` holds the record shared with the kernel, ``program`` builds the eBPF
programs, ``monitor`` loads and reads them, ``model`` and ``table`` turn records into
connections and intervals.
"""
