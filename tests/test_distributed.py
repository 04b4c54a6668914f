"""``quantseal.distributed``: the same results in item order whichever way a map runs (serial,
spawn process pool, Ray tasks, Ray actors), dead Ray workers retried, task errors passed through."""

import os
import re
import sys
import time
from pathlib import Path

import pytest

from quantseal.distributed import LOCAL, RAY_ENV, Fanout, fan_out, import_ray, ray_address
from quantseal.errors import BadInput, Unsupported


# ----------------------------------------------------------------------------- functions the workers run
def slow_square(x: int) -> int:
    """Later items finish first (item 0 sleeps longest), so completion order is reversed."""
    time.sleep(0.05 * (5 - x % 5))
    return x * x


def crash_once(job: tuple[str, int]) -> int:
    """Kill this worker process the first time an item is seen (a marker file remembers it)."""
    folder, x = job
    marker = Path(folder) / f"seen-{x}"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # no exception, no cleanup: the process simply dies
    return -x


def bad_input(x: int) -> int:
    raise BadInput(f"item {x} is bad")


def count_setup(folder: str) -> dict:
    """An actor's set-up: leaves one file per call, returns the state the items read."""
    Path(folder, f"setup-{os.getpid()}-{time.monotonic_ns()}").write_text("")
    return {"offset": 100, "folder": folder}


def add_offset(state: dict, x: int) -> int:
    return state["offset"] + x


def add_offset_crash_once(state: dict, x: int) -> int:
    marker = Path(state["folder"]) / f"seen-{x}"
    if x == 3 and not marker.exists():
        marker.write_text("")
        os._exit(1)
    return state["offset"] + x


@pytest.fixture
def ray_here(ray_local):
    """The session's Ray, with this module's functions shipped by value to its workers."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_local
    ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ----------------------------------------------------------------------------- no Ray needed
def test_ray_address_resolution():
    assert ray_address(None, {}) is None  # no flag, no environment: no Ray
    assert ray_address(None, {RAY_ENV: "  "}) is None
    assert ray_address(None, {RAY_ENV: "ray://head:10001"}) == "ray://head:10001"  # the variable alone turns it on
    assert ray_address("", {}) == LOCAL  # --ray without an address: a local instance
    assert ray_address("", {RAY_ENV: "auto"}) == "auto"
    assert ray_address("ray://a:1", {RAY_ENV: "auto"}) == "ray://a:1"  # the flag wins


def test_fanout_validation_and_description():
    with pytest.raises(BadInput, match="--workers"):
        Fanout(workers=0)
    assert Fanout(1).describe() == "serial"
    assert Fanout(3).describe() == "process pool (3 workers)"
    assert Fanout(2, LOCAL).describe() == "ray (local, 2 CPUs)"


def test_serial_and_process_pool_keep_item_order():
    items = list(range(7))
    seen = []
    ticks = []
    for how in (Fanout(1), Fanout(2)):
        out = fan_out(slow_square, items, how, ticks.append, collect=lambda i, r: seen.append(i) or r)
        assert out == [x * x for x in items]
    assert seen == items + items and ticks == [1] * 14
    assert fan_out(slow_square, [], Fanout(2)) == []


def test_setup_runs_once_serially(tmp_path):
    assert fan_out(add_offset, [1, 2, 3], Fanout(1), setup=count_setup, shared=str(tmp_path)) == [101, 102, 103]
    assert len(list(tmp_path.glob("setup-*"))) == 1


def test_missing_ray_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(Unsupported, match=r"pip install 'quantseal\[ray\]'"):
        import_ray()
    with pytest.raises(Unsupported):
        fan_out(slow_square, [1], Fanout(1, LOCAL))


def test_nothing_else_imports_ray():
    """``import ray`` lives in quantseal.distributed's functions only (the extra is optional)."""
    pattern = re.compile(r"^(\s*)(import ray\b|from ray\b)", re.M)
    root = Path(__file__).resolve().parents[1] / "quantseal"
    hits = {p.name: [m.group(1) for m in pattern.finditer(p.read_text())] for p in root.rglob("*.py")}
    assert {name for name, found in hits.items() if found} == {"distributed.py"}
    assert all(indent for indent in hits["distributed.py"])  # inside a function, not at import time


# ----------------------------------------------------------------------------- Ray
def test_ray_tasks_keep_item_order_not_completion_order(ray_here):
    items = list(range(6))
    arrived = []
    out = fan_out(slow_square, items, Fanout(2, LOCAL), collect=lambda i, r: arrived.append(i) or r)
    assert out == [x * x for x in items]
    assert sorted(arrived) == items


def test_ray_task_whose_worker_dies_is_retried(ray_here, tmp_path):
    jobs = [(str(tmp_path), x) for x in range(2)]
    assert fan_out(crash_once, jobs, Fanout(2, LOCAL, max_retries=2)) == [0, -1]
    assert len(list(tmp_path.glob("seen-*"))) == 2  # every item's first worker died


def test_ray_without_retries_reports_the_dead_worker(ray_here, tmp_path):
    with pytest.raises(ray_here.exceptions.RayError):
        fan_out(crash_once, [(str(tmp_path), 0)], Fanout(1, LOCAL, max_retries=0))


def test_ray_task_errors_come_back_as_themselves(ray_here):
    with pytest.raises(BadInput, match="item 1 is bad"):
        fan_out(bad_input, [1], Fanout(2, LOCAL))


def test_ray_actors_set_up_once_each_and_restart_after_a_death(ray_here, tmp_path):
    out = fan_out(add_offset_crash_once, list(range(6)), Fanout(2, LOCAL, max_retries=2), setup=count_setup,
                  shared=str(tmp_path))
    assert out == [100 + x for x in range(6)]
    # one set-up per actor (not per item), one more for the actor restarted after item 3 killed it
    assert (tmp_path / "seen-3").exists() and len(list(tmp_path.glob("setup-*"))) == 3
