"""Waiting the bluesky way: short waits with checkpoints, progress shown through Status.watch().

Every wait of the plans is :func:`wait_until`: a loop of one short ``bps.wait`` on a
:class:`Progress` status (so the RunEngine's ``waiting_hook``, e.g. bluesky's
``ProgressBarManager``, sees it), a ``bps.checkpoint`` (where a deferred pause takes
effect; an immediate pause resumes there) and the caller's readback check.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bluesky import plan_stubs as bps
from bluesky.utils import MsgGenerator, short_uid
from ophyd.status import Status

from .errors import GatewayError, WaitExpired

__all__ = ["DEFAULT_POLL_PERIOD", "DEFAULT_TIMING", "Progress", "Timing", "wait_until"]

log = logging.getLogger("apsdm_ophyd")

#: Seconds between two readback checks of a wait (a pause takes effect within one).
DEFAULT_POLL_PERIOD = 0.5


@dataclass(frozen=True)
class Timing:
    """How often the plans check and report, and how long each wait may take (seconds).

    Timeouts count waiting time (not time paused). A job that outlives ``job_timeout`` goes
    on in DM: the plan stops following it, releases the slot and reports ``timeout``.
    """

    poll_period: float = DEFAULT_POLL_PERIOD
    reporting_period: float = 10.0
    daq_timeout: float = 120.0
    upload_timeout: float = 600.0
    ready_timeout: float = 60.0
    job_timeout: float = 3600.0


DEFAULT_TIMING = Timing()


class Progress(Status):
    """A Status the plan finishes itself and feeds from readbacks; ``watch()`` reports progress.

    ``trigger()`` returns the status itself, so ``bps.trigger`` can put it in a wait group.
    """

    def __init__(self, name: str, target: float = 0.0, unit: str = "") -> None:
        super().__init__()
        self.name, self.target, self.unit = name, float(target), unit
        self.current = 0.0
        self._began = time.monotonic()
        self._watchers: list[Callable[..., Any]] = []

    def watch(self, func: Callable[..., Any]) -> None:
        """Call ``func`` with ophyd's progress keywords on every update (ProgressBar does)."""
        self._watchers.append(func)

    def trigger(self) -> "Progress":
        """This status, for ``bps.trigger(progress, group=...)``."""
        return self

    def update(self, current: float, target: float | None = None) -> None:
        """Report ``current`` of ``target`` (the target may grow while waiting)."""
        if target is not None:
            self.target = float(target)
        self.current = float(current)
        elapsed = time.monotonic() - self._began
        done = min(self.current / self.target, 1.0) if self.target > 0 else 0.0
        remaining = elapsed * (1 - done) / done if done else None
        for func in self._watchers:
            func(name=self.name, current=self.current, initial=0.0, target=self.target,
                 unit=self.unit, precision=0, fraction=1.0 - done, time_elapsed=elapsed,
                 time_remaining=remaining)


def wait_until(check: Callable[[], MsgGenerator[bool]], *, timeout: float,
               poll_period: float = DEFAULT_POLL_PERIOD, what: str,
               progress: Progress | None = None) -> MsgGenerator[None]:
    """Re-run ``check`` (a plan returning True when done) every ``poll_period`` s.

    ``timeout`` counts seconds of waiting, so time spent paused does not use it up;
    raises :class:`WaitExpired` naming ``what``. A read in ``check`` that times out (a loaded
    IOC, a dropped connection) counts as not done yet: it is logged, and only the wait's own
    ``timeout`` ends the wait. ``progress`` (finished here) is shown while waiting.
    """
    group = short_uid("dm-wait")
    waited = 0.0
    missed = False  # a read has timed out in this wait (warned once)
    try:
        while True:
            try:
                if (yield from check()):
                    break
            except WaitExpired:  # a wait inside check: its own end
                raise
            except TimeoutError as exc:  # ophyd's ReadTimeoutError, p4p's TimeoutError
                log.log(logging.DEBUG if missed else logging.WARNING,
                        "%s: a readback did not answer (%s); still waiting", what, exc)
                missed = True
            if waited >= timeout:
                raise WaitExpired(f"{what}: not done after {timeout:g} s")
            if progress is None:
                yield from bps.sleep(poll_period)
            else:  # re-added each time: an immediate pause empties the RunEngine's group
                yield from bps.trigger(progress, group=group)
                yield from bps.wait(group, timeout=poll_period, error_on_timeout=False)
            yield from bps.checkpoint()
            waited += poll_period
    except (GatewayError, TimeoutError):
        yield from _close(progress, group)
        raise
    yield from _close(progress, group)


def _close(progress: Progress | None, group: str) -> MsgGenerator[None]:
    """Finish the status and let the waiting hook see it end (closes a progress bar)."""
    if progress is None:
        return
    if not progress.done:
        progress.set_finished()
    yield from bps.trigger(progress, group=group)
    # the same wait-and-move-on kind as the loop's, so the hook hears "done", not a new wait
    yield from bps.wait(group, timeout=1.0, error_on_timeout=False)
