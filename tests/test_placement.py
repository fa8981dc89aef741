"""Jobs placed over the GPUs: the assignment (fine-tunes, soups, the models evaluated, torchrun ranks) is a pure
function tested here with given device counts (no GPU needed); the slots that keep at most `per_device` fine-tunes on
one GPU, and the evaluation's one thread per device, are tested with real threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from soup_pipeline.config import Params
from soup_pipeline.runtime import placement
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.runtime.placement import DeviceSlots, dealt_device, on_devices, placed_device, spread_devices
from soup_pipeline.stages.soup import soup_device, soup_devices


def test_auto_and_cuda_spread_over_every_visible_gpu_and_the_cpu_path_is_unchanged():
    assert spread_devices("auto", 8) == [f"cuda:{i}" for i in range(8)]
    assert spread_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert spread_devices("cuda:1", 2) == ["cuda:1"]
    assert spread_devices("auto", 0) == ["cpu"] and spread_devices("cpu", 4) == ["cpu"]
    with pytest.raises(SoupError, match="no CUDA GPU is visible"):
        spread_devices("cuda", 0)
    with pytest.raises(SoupError, match=r"only 2 GPU\(s\) are visible"):
        spread_devices("cuda:2", 2)


def test_members_are_dealt_round_robin_by_id_so_growing_the_sweep_moves_none():
    devices = ["cuda:0", "cuda:1", "cuda:2"]
    placed = {member: dealt_device(member, devices) for member in (0, 1, 2, 3, 4, 10, 11)}
    assert placed == {0: "cuda:0", 1: "cuda:1", 2: "cuda:2", 3: "cuda:0", 4: "cuda:1", 10: "cuda:1", 11: "cuda:2"}
    assert dealt_device(5, ["cpu"]) == "cpu"


def test_slots_keep_at_most_per_device_holders_on_one_gpu_and_leave_the_cpu_alone():
    slots = DeviceSlots(per_device=2)

    def holder(device: str) -> threading.Event:
        entered = threading.Event()

        def hold() -> None:
            with slots.hold(device):
                entered.set()

        threading.Thread(target=hold, daemon=True).start()
        return entered

    with slots.hold("cuda:0"), slots.hold("cuda:0"):
        third = holder("cuda:0")
        assert not third.wait(0.3)  # two fine-tunes hold cuda:0: the third waits
        assert holder("cuda:1").wait(5)  # another GPU has room
        with slots.hold("cpu"), slots.hold("cpu"), slots.hold("cpu"):  # the CPU is not limited by slots
            pass
    assert third.wait(5)  # a slot came free


def test_a_torchrun_rank_takes_its_own_gpu_unless_the_setting_names_one_and_the_cpu_stays_the_cpu():
    assert placed_device("auto", 5, 4, local_rank=2) == "cuda:2"  # the slot does not move a rank
    assert placed_device("cuda", 0, 4, local_rank=3) == "cuda:3"
    assert placed_device("cuda:1", 0, 4, local_rank=3) == "cuda:1"  # named: kept, as before
    assert placed_device("auto", 1, 0, local_rank=1) == "cpu" and placed_device("cpu", 1, 4, local_rank=1) == "cpu"
    assert placed_device("auto", 5, 4) == "cuda:1"  # no rank: dealt
    with pytest.raises(SoupError, match="soup.device 'cuda': local rank 2 has no GPU of its own"):
        placed_device("cuda", 0, 2, local_rank=2, key="soup.device")


def test_soups_are_dealt_by_their_place_in_the_build_order_and_a_method_may_name_its_own_gpu(monkeypatch):
    params = Params.model_validate({"soup": {"methods": {"uniform": {}, "greedy": {}, "ties": {"device": "cuda:0"},
                                                         "mehl_soup": {}},
                                             "refine": {"wise_ft_soup": {"soup": "greedy"}}}})
    monkeypatch.setattr(placement, "visible_gpus", lambda: 3)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    placed = {method: str(soup_device(params, method)) for method in params.soup.built}
    assert placed == {"uniform": "cuda:0", "greedy": "cuda:1", "ties": "cuda:0", "mehl_soup": "cuda:0",
                      "wise_ft_soup": "cuda:1"}
    monkeypatch.setenv("LOCAL_RANK", "2")  # a rank of a soup on several processes
    assert str(soup_device(params, "mehl_soup")) == "cuda:2"
    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    assert {str(soup_device(params, method)) for method in ("uniform", "greedy", "mehl_soup")} == {"cpu"}
    with pytest.raises(SoupError, match="soup.device 'cuda:0' asked for but no CUDA GPU is visible"):
        soup_device(params, "ties")


def test_jobs_of_one_device_run_one_after_another_and_different_devices_side_by_side():
    gpus = [torch.device("cuda:0"), torch.device("cuda:1")]  # names only: the jobs never touch them
    meeting = threading.Barrier(2, timeout=5)  # passed only when a job of each GPU runs at the same time
    active = {device: 0 for device in gpus}
    overlapped = []
    lock = threading.Lock()

    def job(index: int, device: torch.device) -> tuple[int, str]:
        with lock:
            active[device] += 1
            overlapped.append(active[device] > 1)
        if index < 2:
            meeting.wait()
        time.sleep(0.02)
        with lock:
            active[device] -= 1
        return index, threading.current_thread().name

    devices = [gpus[index % 2] for index in range(6)]
    results = on_devices([lambda device, index=index: job(index, device) for index in range(6)], devices)
    assert [index for index, _ in results] == list(range(6))  # in the jobs' order
    assert not any(overlapped)  # never two jobs on one device at once
    assert len({thread for _, thread in results}) == 2  # a thread per device
    here = on_devices([lambda device, index=index: job(index + 2, device) for index in range(3)], [gpus[0]] * 3)
    assert {thread for _, thread in here} == {threading.current_thread().name}  # one device: in this thread


def test_soup_slots_hold_the_cpu_too_and_holders_of_overlapping_gpus_never_wait_on_each_other():
    slots = DeviceSlots(per_device=1, cpu=True)
    with slots.hold("cpu"):
        waiting = threading.Thread(target=lambda: slots.hold("cpu").__enter__(), daemon=True)
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # a second soup on the CPU waits for the first
    done = []

    def holder(devices: list[str]) -> None:
        for _ in range(200):
            with slots.hold_all(devices):
                pass
        done.append(devices)

    threads = [threading.Thread(target=holder, args=(devices,), daemon=True)
               for devices in (["cuda:0", "cuda:1"], ["cuda:1", "cuda:0"], ["cuda:1"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(done) == 3  # in one order: no two holders each wait for the other's GPU


def test_a_soup_on_several_processes_occupies_each_local_ranks_gpu(monkeypatch):
    params = Params.model_validate({"soup": {"methods": {"uniform": {}, "mehl_soup": {"nproc": 2}}}})
    monkeypatch.setattr(placement, "visible_gpus", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert soup_devices(params, "mehl_soup") == ["cuda:0", "cuda:1"] and soup_devices(params, "uniform") == ["cuda:0"]
    monkeypatch.setattr(placement, "visible_gpus", lambda: 0)
    assert set(soup_devices(params, "mehl_soup")) == {"cpu"}
