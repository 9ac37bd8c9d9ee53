"""Struct layouts: the field catalogue, Offsets profiles (BTF or guessed), the guesser."""

#: where struct offsets may come from (``offsets.source``): BTF when the kernel has it,
#: else a cached or new guess; only BTF; guessed now (:mod:`nettracer.layout.source`)
SOURCES = ("auto", "btf", "guess")
