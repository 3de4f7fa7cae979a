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


def on_threads(items: list, at_once: int, work: Callable[[Any], T]) -> dict[Any, T | BaseException]:
    """``work(item)`` for every item on ``at_once`` daemon threads; item -> result or the exception
    it raised (the other items go on; the caller decides what to raise).

    Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit,
    so a Ctrl-C would wait for every running fit to finish. The calling thread waits in short
    joins, so it stays interruptible.
    """
    queue, results, lock = list(items), {}, threading.Lock()

    def worker() -> None:
        """Take items until none are left."""
        while True:
            with lock:
                if not queue:
                    return
                item = queue.pop(0)
            try:
                results[item] = work(item)
            except BaseException as e:  # handed to the caller
                results[item] = e

    threads = [threading.Thread(target=worker, name=f"fit-{i}", daemon=True) for i in range(at_once)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    return results


def off_main_thread(fit: Callable[[], T]) -> T:
    """``fit()`` (a Ray Train trainer's or a Tune tuner's) run on a daemon thread while the main
    thread waits, so that Ctrl-C stays the KeyboardInterrupt every stage raises.

    Called on the main thread, both install a SIGINT handler of their own and never put ours back:
    Ray Train's aborts the run and ends the process (status 0 or 1, Ray's traceback), Tune's stops
    the experiment and returns what finished, and a Ctrl-C later in the same process (in sampling,
    after a fine-tune) was ignored. Off the main thread they install none. The run's actors are
    owned by this process and end with it. Already off it (a phase of ``finetune.class_phases``),
    ``fit()`` runs where it is called.
    """
    if threading.current_thread() is not threading.main_thread():
        return fit()
    outcome = on_threads([0], 1, lambda _: fit())[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
