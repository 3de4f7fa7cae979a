"""Running work on a Ray cluster from the driver: an actor pool that outlives lost nodes, and
Ray Train's and Tune's ``fit()`` kept off the main thread so that Ctrl-C stays ours.

Plain helpers with no knowledge of the stages; sizing the pools is mmdist.ray_runtime's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ray


def elastic_map(actors: list, submit: Callable[[Any, Any], Any], items: list) -> Iterator[Any]:
    """Results of ``submit(actor, item)`` for every item, in completion order, each item given to
    an actor as soon as that actor has started.

    All actors are requested at once (pending actors are the demand an autoscaler scales on), but
    work goes only to started ones, so a pool larger than the cluster ever holds still finishes.
    An item whose actor was lost mid-task (its node died, or it is restarting elsewhere and Ray's
    own task retries ran out first) goes back in the queue; the actor rejoins once it has started
    again, or never if it is dead for good. Actors that never started are the caller's to kill,
    which withdraws their demand.
    """
    starting = {a.__ray_ready__.remote(): a for a in actors}
    idle: list = []
    running: dict = {}  # task ref -> (actor, item)
    queue = list(items)
    while queue or running:
        if starting:
            ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in ready:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.ActorUnavailableError:  # restarting after its node was lost: ask again
                    time.sleep(0.2)
                    starting[actor.__ray_ready__.remote()] = actor
                except ray.exceptions.RayActorError:  # dead for good (restarts spent): the others carry on
                    pass
        while queue and idle:
            actor, item = idle.pop(), queue.pop(0)
            running[submit(actor, item)] = (actor, item)
        if running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                actor, item = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError:
                    queue.insert(0, item)
                    starting[actor.__ray_ready__.remote()] = actor
                    continue
                idle.append(actor)
                yield result
        elif starting:
            ray.wait(list(starting), num_returns=1, timeout=1.0)
        else:
            raise RuntimeError("no actor of the pool could start")


T = TypeVar("T")


def off_main_thread(fit: Callable[[], T]) -> T:
    """``fit()`` (a Ray Train trainer's or a Tune tuner's) run on a daemon thread while the main
    thread waits, so that Ctrl-C stays the KeyboardInterrupt every stage raises.

    Called on the main thread, both install a SIGINT handler of their own and never put ours back:
    Ray Train's aborts the run and ends the process (status 0 or 1, Ray's traceback), Tune's stops
    the experiment and returns what finished, and a Ctrl-C later in the same process (in sampling,
    after a fine-tune) was ignored. Off the main thread they install none. The run's actors are
    owned by this process and end with it.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fit()
        except BaseException as e:  # handed to the main thread, which raises it
            outcome["error"] = e

    thread = threading.Thread(target=target, name="ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
