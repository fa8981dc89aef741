"""Fine-tunes placed one per GPU: the assignment is a pure function tested here with given device lists (no GPU
needed), and the slots that keep at most `per_device` fine-tunes on one GPU are tested with real threads."""

from __future__ import annotations

import threading

import pytest

from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.runtime.placement import DeviceSlots, member_device, sweep_devices


def test_auto_and_cuda_spread_over_every_visible_gpu_and_the_cpu_path_is_unchanged():
    assert sweep_devices("auto", 8) == [f"cuda:{i}" for i in range(8)]
    assert sweep_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert sweep_devices("cuda:1", 2) == ["cuda:1"]
    assert sweep_devices("auto", 0) == ["cpu"] and sweep_devices("cpu", 4) == ["cpu"]
    with pytest.raises(SoupError, match="no CUDA GPU is visible"):
        sweep_devices("cuda", 0)
    with pytest.raises(SoupError, match=r"only 2 GPU\(s\) are visible"):
        sweep_devices("cuda:2", 2)


def test_members_are_dealt_round_robin_by_id_so_growing_the_sweep_moves_none():
    devices = ["cuda:0", "cuda:1", "cuda:2"]
    placed = {member: member_device(member, devices) for member in (0, 1, 2, 3, 4, 10, 11)}
    assert placed == {0: "cuda:0", 1: "cuda:1", 2: "cuda:2", 3: "cuda:0", 4: "cuda:1", 10: "cuda:1", 11: "cuda:2"}
    assert member_device(5, ["cpu"]) == "cpu"


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
