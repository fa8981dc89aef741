"""Named points of a run where a crash-recovery test makes it die as the OOM killer would.

`SOUP_KILL_AT=<point>` SIGKILLs the process group of the first process that imported this module
(the run and its children, such as a `dvc` command or torchrun's ranks, which start groups of
their own; or `dvc repro` and its stage) the first time a process reaches that point, and
`SOUP_KILL_AT=<point>:<n>` when it reaches it for instance n (a sweep member); unset, a point
does nothing. The tests kill a run at each point, rerun it and check that nothing was lost.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "SOUP_KILL_AT"
GROUP_ENV = "SOUP_KILL_GROUP"  # the process group to kill, recorded by the first process and inherited
POINTS = (
    "pretrain-epoch",  # pre-training, after its first epoch
    "finetune-saved",  # the sweep, after a member's ingredient is written
    "mehl-block",  # a hyperplane soup, inside its second block (the first one's resume state is on disk)
    "evaluate-method",  # evaluation, after the first method is evaluated and before anything is written
    "dvc-committed",  # after the flow's `dvc commit`, before its `dvc push`
    "registered",  # after the soup's model version is created, before the champion alias moves
)


def armed(point: str, instance: int | None = None) -> bool:
    """Whether SOUP_KILL_AT names `point` (any instance, or this one): to install a hook only when a test asks."""
    assert point in POINTS, point
    return os.environ.get(KILL_AT_ENV) in (point, f"{point}:{instance}")


def reached(point: str, instance: int | None = None) -> None:
    """Die here, with the run's whole process group, if SOUP_KILL_AT names `point`."""
    if armed(point, instance):
        os.killpg(int(os.environ[GROUP_ENV]), signal.SIGKILL)
        os.killpg(os.getpgid(0), signal.SIGKILL)  # this process's own group, when it started one (a torchrun rank)


if KILL_AT_ENV in os.environ:
    os.environ.setdefault(GROUP_ENV, str(os.getpgid(0)))
