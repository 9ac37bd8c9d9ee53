"""The offset guesser: struct offsets found in kernel memory from traffic whose values
we know.

``run`` drives the rounds (private namespaces, probes, traffic), ``probes`` holds the
eBPF programs that snapshot structs, ``traffic`` and ``expected`` say what each round
did and which values must therefore be in memory, ``matchers`` and ``analysis`` find
the offsets that hold them and give a verdict per field.
"""

from nettracer.layout.guess.run import (
    DEFAULT_TIMEOUT_MS,
    GuessResult,
    GuessTimeout,
    RoundFailed,
    guess,
    guess_offsets,
)

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "GuessResult",
    "GuessTimeout",
    "RoundFailed",
    "guess",
    "guess_offsets",
]
