"""Fan-out of independent work items: in this process, on a process pool, or as Ray tasks.

Two jobs are maps over independent items (DESIGN §3, §8): the LQ candidate table (one item per
matrix, :mod:`quantseal.compress.pipeline`) and per-customer exports
(:mod:`quantseal.export.batch`).  Each runs here in one of three ways, all giving the same
results in the same order (item order, never completion order), so the bytes written do not
depend on the way:

* ``workers <= 1``: a plain loop;
* a spawn-started :class:`~concurrent.futures.ProcessPoolExecutor` of ``workers`` processes;
* Ray (``--ray [ADDRESS]`` or ``QUANTSEAL_RAY_ADDRESS``): a local instance with ``num_cpus =
  workers`` (``ray.init(num_cpus=…)``), or an existing cluster (``ray.init(address=…)``).
  Each item goes to the object store and runs as a task (``max_retries``: a task whose worker
  process dies is run again).  With a ``setup``, the items run on a small pool of actors instead,
  each of which calls ``setup(shared)`` once (e.g. unpacks a checkpoint shipped through the
  object store) and keeps the result; a dead actor is restarted and its task retried
  (``max_restarts`` / ``max_task_retries``).

Ray is an optional extra (``pip install 'quantseal[ray]'``) and this is the only module that
imports it, lazily.  Worker processes compute with one torch thread each.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import BadInput, QuantsealError, Unsupported

RAY_ENV = "QUANTSEAL_RAY_ADDRESS"
LOCAL = "local"  # start a private local Ray instance
DEFAULT_RETRIES = 3

Tick = Callable[[int], None]
Collect = Callable[[int, Any], Any]


def _no_tick(n: int = 1) -> None:
    return None


def _keep(i: int, result):
    return result


def ray_address(flag: str | None, environ: dict | None = None) -> str | None:
    """Resolve ``--ray [ADDRESS]``: ``None`` (flag absent and ``QUANTSEAL_RAY_ADDRESS`` unset or
    empty) means no Ray; the flag without a value (``""``) means ``QUANTSEAL_RAY_ADDRESS`` if set,
    else :data:`LOCAL`; any other value is the address (``auto``, ``ray://host:10001``, ``local``)."""
    env = (os.environ if environ is None else environ).get(RAY_ENV, "").strip()
    if flag is None:
        return env or None
    flag = flag.strip()
    return flag or env or LOCAL


@dataclass(frozen=True)
class Fanout:
    """How to run a map: ``workers`` local processes (or Ray CPUs for a local Ray instance), and
    ``ray`` the Ray address (``None``: no Ray)."""

    workers: int = 1
    ray: str | None = None
    max_retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise BadInput(f"--workers must be at least 1, not {self.workers}")

    def describe(self) -> str:
        if self.ray is None:
            return "serial" if self.workers <= 1 else f"process pool ({self.workers} workers)"
        return f"ray ({'local, ' + str(self.workers) + ' CPUs' if self.ray == LOCAL else self.ray})"


def import_ray():
    """``import ray``, or :class:`Unsupported` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise Unsupported("--ray needs Ray: pip install 'quantseal[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str, num_cpus: int) -> Iterator[Any]:
    """The ``ray`` module, connected: a Ray already initialised in this process is used as it is
    (and left running); else ``ray.init`` a local instance (``address == LOCAL``, ``num_cpus``
    CPUs, no dashboard) or connects to ``address``, and shuts down at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address == LOCAL:
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise Unsupported(f"cannot start or reach Ray at {address!r}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _one_thread() -> None:
    """A worker computes with one torch thread (its siblings use the other cores); torch is not
    imported for it: a worker whose function never needs torch stays light."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"


def _call(fn: Callable, item):
    _one_thread()
    return fn(item)


def _reraise(ray, exc: BaseException):
    """A task's :class:`QuantsealError` comes back as itself (one line, exit 2); anything else
    keeps Ray's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, QuantsealError):
        raise cause from None
    raise exc


class _Host:
    """A Ray actor's body: ``setup(shared)`` once, then ``fn(state, item)`` per call.

    ``shared`` arrives as ``[ObjectRef]`` and is fetched here: the driver holds the reference for
    the whole map, so a restarted actor can fetch it again."""

    def __init__(self, setup: Callable, shared_ref: list) -> None:
        import ray

        _one_thread()
        self.state = setup(ray.get(shared_ref[0]))

    def run(self, fn: Callable, item):
        return fn(self.state, item)

    def close(self) -> None:
        if hasattr(self.state, "close"):
            self.state.close()


def _ray_tasks(ray, fn: Callable, items: Sequence, retries: int, tick: Tick, collect: Collect) -> list:
    remote = ray.remote(num_cpus=1, max_retries=retries)(_call)
    refs = {remote.remote(fn, ray.put(item)): i for i, item in enumerate(items)}  # each item via the object store
    results: list = [None] * len(items)
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i = refs.pop(ref)
                results[i] = collect(i, ray.get(ref))  # stored by item index, not completion order
                tick(1)
    except ray.exceptions.RayError as exc:
        for ref in refs:
            ray.cancel(ref, force=True)
        _reraise(ray, exc)
    return results


def _ray_actors(ray, fn: Callable, items: Sequence, setup: Callable, shared, n_actors: int, retries: int,
                tick: Tick, collect: Collect) -> list:
    host = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(_Host)
    shared_ref = ray.put(shared)
    actors = [host.remote(setup, [shared_ref]) for _ in range(max(1, min(n_actors, len(items))))]
    results: list = [None] * len(items)
    in_flight: dict = {}  # ref → (item index, actor)
    queue = list(range(len(items)))
    try:
        for actor in actors:
            if queue:
                i = queue.pop(0)
                in_flight[actor.run.remote(fn, items[i])] = (i, actor)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                i, actor = in_flight.pop(ref)
                results[i] = collect(i, ray.get(ref))
                tick(1)
                if queue:
                    j = queue.pop(0)
                    in_flight[actor.run.remote(fn, items[j])] = (j, actor)
    except ray.exceptions.RayError as exc:
        _reraise(ray, exc)
    finally:
        for actor in actors:
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # a dead actor has nothing left to clean
                pass
            ray.kill(actor)
    return results


def _pool_setup_call(setup_fn_shared_item):
    setup, shared, fn, item = setup_fn_shared_item
    _one_thread()  # torch may have been imported by unpickling fn
    return fn(setup(shared), item)


def fan_out(fn: Callable, items: Sequence, how: Fanout, tick: Tick = _no_tick, *,
            setup: Callable | None = None, shared=None, collect: Collect = _keep) -> list:
    """``[fn(item) for item in items]`` (or ``[fn(setup(shared), item) …]`` when ``setup`` is
    given), in item order, run as ``how`` says.  ``fn`` and ``setup`` must be importable
    module-level functions (or picklable by value).  Each result, as it arrives in this process,
    goes through ``collect(index, result)`` (e.g. to write it out and drop its bytes) and what that
    returns is kept; ``tick(1)`` follows.  On Ray with a ``setup``, ``how.workers`` actors.

    Locally ``setup`` is called once (serial) or once per item (process pool: ``shared`` then
    travels with each item, so keep it a path there)."""
    items = list(items)
    if not items:
        return []
    if how.ray is not None:
        with ray_session(how.ray, how.workers) as ray:
            if setup is None:
                return _ray_tasks(ray, fn, items, how.max_retries, tick, collect)
            return _ray_actors(ray, fn, items, setup, shared, how.workers, how.max_retries, tick, collect)
    if how.workers <= 1 or len(items) == 1:
        state = setup(shared) if setup is not None else None
        out = []
        for i, item in enumerate(items):
            out.append(collect(i, fn(item) if setup is None else fn(state, item)))
            tick(1)
        return out
    ctx = multiprocessing.get_context("spawn")
    jobs = [(fn, item) for item in items] if setup is None else [(setup, shared, fn, item) for item in items]
    call = _pool_call if setup is None else _pool_setup_call
    with ProcessPoolExecutor(max_workers=min(how.workers, len(items)), mp_context=ctx,
                             initializer=_one_thread) as pool:
        out = []
        for i, res in enumerate(pool.map(call, jobs)):  # item order
            out.append(collect(i, res))
            tick(1)
        return out


def _pool_call(fn_item):
    fn, item = fn_item
    _one_thread()  # torch may have been imported by unpickling fn
    return fn(item)
