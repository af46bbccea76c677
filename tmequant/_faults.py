"""Test-only fault injection: kill the process at a named checkpoint.

Library code calls :func:`checkpoint` at points where a crash is interesting (after a tile
shard is written, after a prediction chunk is flagged done, between the files of a slide's
results, while the cohort report is written). Normally that is a dictionary lookup and
nothing happens. With the environment variable ``TMEQUANT_FAULT=<name>:<n>`` set, the
``n``-th call (1-based) of ``checkpoint(<name>)`` in this process ends it at once:

- ``TMEQUANT_FAULT_SIGNAL=KILL`` (default): ``SIGKILL``, as the kernel's OOM killer or a
  pulled plug would; nothing is flushed, no ``finally`` runs.
- ``TMEQUANT_FAULT_SIGNAL=INT``: ``SIGINT`` to itself, as Ctrl-C would (the CLI must stop
  with its one-line message and exit 130).
- ``TMEQUANT_FAULT_SIGNAL=STOP``: ``SIGSTOP`` to itself, a hung run that keeps its output
  lock until the test sends ``SIGCONT``.

Several faults can be given separated by commas (``tile_shard:2,report:1``); the first one
reached fires. The tests in ``tests/test_crash*.py`` use this to check that a rerun after a
kill at each point gives the same outputs as an uninterrupted run.

Checkpoint names in use: ``tile_shard`` (tiling), ``predict_chunk`` (inference),
``count`` (nucleus counter), ``slide_result`` (per-slide result files), ``report``
(cohort report, per slide's pictures).
"""

from __future__ import annotations

import os
import signal

ENV = "TMEQUANT_FAULT"
ENV_SIGNAL = "TMEQUANT_FAULT_SIGNAL"

_counts: dict[str, int] = {}
_plan_cache: tuple[str, dict[str, int]] | None = None


def _plan() -> dict[str, int]:
    """{checkpoint name: call number to fire at}, parsed once per value of the variable."""
    global _plan_cache
    spec = os.environ.get(ENV, "")
    if _plan_cache is not None and _plan_cache[0] == spec:
        return _plan_cache[1]
    plan: dict[str, int] = {}
    for part in spec.split(","):
        name, _, n = part.strip().partition(":")
        if name:
            try:
                plan[name] = max(1, int(n or 1))
            except ValueError:
                plan[name] = 1
    _plan_cache = (spec, plan)
    return plan


def checkpoint(name: str) -> None:
    """Mark a crash point; kills the process when ``TMEQUANT_FAULT`` names it (tests only)."""
    if ENV not in os.environ:  # the normal case: one lookup, nothing else
        return
    plan = _plan()
    if name not in plan:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == plan[name]:
        sig = os.environ.get(ENV_SIGNAL, "KILL").upper().removeprefix("SIG")
        if sig == "INT":
            # Ctrl-C: Python raises KeyboardInterrupt in the main thread at the next bytecode.
            os.kill(os.getpid(), signal.SIGINT)
            return
        if sig == "STOP":  # a hung run: stopped until SIGCONT, holding what it holds
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the call counts (for in-process tests)."""
    _counts.clear()


__all__ = ["ENV", "ENV_SIGNAL", "checkpoint", "reset"]
