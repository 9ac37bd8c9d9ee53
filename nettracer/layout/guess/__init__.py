"""The offset guesser: struct offsets found in kernel memory from traffic whose values
we know.

* ``run`` drives the rounds (:func:`guess`);
* ``netns`` and ``rtnl`` build the two private network namespaces and their veth pair;
* ``probes`` loads the eBPF programs that snapshot structs as the traffic passes;
* ``traffic`` makes that traffic step by step and logs what each step did;
* ``expected`` turns what the kernel tells a socket's owner (``getsockname``,
  ``TCP_INFO``, ...) into expected values, as ``matchers`` (byte patterns that find a
  value in a snapshot);
* ``analysis`` pairs snapshots with expected values, and ``verdicts`` applies the rule
  that resolves a field (one offset agrees with every observation) or says why not.
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
