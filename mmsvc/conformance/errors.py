"""Exceptions of the kernel runner, split by who has to act on them."""

from __future__ import annotations


class KernelRunnerError(Exception):
    """Base class for every kernel-runner failure."""


class HostUnsupported(KernelRunnerError):
    """The host cannot run the oracle (not root, no kpageflags, no compiler, one CPU ...).

    Tests skip on this; everything else is a real failure.
    """


class ScenarioError(KernelRunnerError):
    """The trace itself is malformed or asks for something the runner does not support."""


class Unsupported(ScenarioError):
    """A well-formed op that this runner does not implement."""


class ExecutorFailure(KernelRunnerError):
    """The C scenario executor misbehaved (died, timed out, answered nonsense)."""


class Disturbed(KernelRunnerError):
    """No two clean runs agreed: something else on the machine perturbed the observations.

    `disagreements` counts clean attempts whose document differed from the previous clean one.
    Zero means the host was only too busy (every attempt was flagged); more than zero means runs
    that looked clean disagreed, which is either undetected noise or a nondeterministic runner.
    """

    def __init__(self, message: str, disagreements: int = 0) -> None:
        super().__init__(message)
        self.disagreements = disagreements
