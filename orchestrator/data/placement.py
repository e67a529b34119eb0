"""Where the run's small state actors live (the bad-clip tracker, the resume-progress registry).

On the head node: a worker node can be a spot instance that goes away, and with it an actor's
state (a node loss killed the progress registry with the training workers, and the resumed run
could not start its epoch).  Never inside the caller's placement group: a Tune trial's bundles
hold no head-node resource, and the actors serve the whole run, not one bundle.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


def outside_caller_group():
    """A scheduling strategy that ignores the caller's placement group (as Ray Data's own tasks do):
    a Tune trial's bundle is the trial driver's alone."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)


def head_actor_options() -> dict[str, Any]:
    """``.options(...)`` for a zero-CPU state actor pinned to the head node (where it has one)."""
    import ray

    options: dict[str, Any] = {"scheduling_strategy": outside_caller_group()}
    if HEAD_RESOURCE in ray.cluster_resources():
        options["resources"] = {HEAD_RESOURCE: 0.001}
    return options


def end_state_actor(name: str, namespace: str, handle=None) -> None:
    """End a finished run's state actor (``handle``, else looked up by name); none by that name,
    or one already gone, is nothing to end."""
    import ray

    try:
        ray.kill(handle or ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:  # no such actor
        pass
    except Exception as e:  # already gone, or Ray going down
        log.debug("state actor %s: %s", name, e)
