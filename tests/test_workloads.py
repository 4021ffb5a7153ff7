"""The benchmark workloads are fixed data: the same work in every run and for every engine compared."""
import time

import torch

from benchmarks.workloads import TOKEN_RANGE, W6_MAX_MODEL_LEN, fresh, w1, w1_hf, w5, w6


def test_w1_is_nano_vllms_benchmark():
    requests = w1()
    assert len(requests) == 256 and sum(kw["max_tokens"] for _, kw in requests) == 133966
    assert all(100 <= len(p) <= 1024 and max(p) <= TOKEN_RANGE and kw["ignore_eos"] for p, kw in requests)
    assert w1() == requests


def test_w1_hf_is_equal_work_for_both_engines():
    hf = w1_hf()
    assert [p for p, _ in hf] == [p for p, _ in w1()[:32]]
    assert all(kw == dict(temperature=0.6, max_tokens=256, ignore_eos=True) for _, kw in hf)


def test_w5_and_w6_shapes():
    rows = w5()
    assert len(rows) == 2048 and not any(kw["ignore_eos"] for _, kw in rows)
    assert all(100 <= len(p) <= 1024 and 100 <= kw["max_tokens"] <= 1024 for p, kw in rows)
    mixed = w6()
    long = [p for p, _ in mixed if len(p) > 1024]
    assert len(long) == 32 and len(mixed) == 544
    assert all(16384 <= len(p) and len(p) + 256 <= W6_MAX_MODEL_LEN for p in long)


def test_fresh_keeps_lengths_and_settings_but_not_ids():
    requests = w1()[:8]
    again = fresh(requests, 1)
    assert [len(p) for p, _ in again] == [len(p) for p, _ in requests]
    assert [kw for _, kw in again] == [kw for _, kw in requests]
    assert all(a != b for (a, _), (b, _) in zip(again, requests))


def test_host_events_count_collections():
    import gc

    from benchmarks import throughput

    events = throughput.HostEvents()
    gc.collect(2)
    gc.collect(0)
    totals = events.close()
    assert totals["gc_collections"][2] >= 1 and totals["gc_collections"][0] >= 1 and totals["gc_ms"][2] > 0
    assert set(throughput.ALLOCATOR_COUNTERS) <= set(totals)
    gc.collect(2)
    assert events.sample()["gc_collections"] == totals["gc_collections"]  # closed: no longer counting


def test_host_events_count_kernel_loads(monkeypatch):
    """A Triton kernel's first launch in the process loads it (``CompiledKernel._init_handles`` with no module
    yet): counted while the events are open; later launches, and anything after ``close()``, are not."""
    from types import SimpleNamespace

    from triton.compiler.compiler import CompiledKernel

    from benchmarks import throughput

    def load(kernel):  # stands in for the driver's module load
        kernel.module = "loaded"
    monkeypatch.setattr(CompiledKernel, "_init_handles", load)
    events = throughput.HostEvents()
    first, second = SimpleNamespace(module=None), SimpleNamespace(module=None)
    CompiledKernel._init_handles(first)
    CompiledKernel._init_handles(first)  # a later launch: already loaded
    assert events.sample()["kernel_loads"] == 1 and first.module == "loaded"
    totals = events.close()
    CompiledKernel._init_handles(second)
    assert second.module == "loaded" and events.sample()["kernel_loads"] == totals["kernel_loads"] == 1
    assert CompiledKernel._init_handles is load  # restored


def test_host_profile_w6_lists_the_phases_of_slow_mixed_steps(monkeypatch, capsys):
    """benchmarks/host_profile.py --workload W6 on a small stand-in for W6 (demo-random, 300-token prompts, a
    512-token budget so that prompts are admitted beside decode rows), every mixed step counted as slow."""
    from benchmarks import host_profile
    from engine import LLM

    small = [([t % 400 for t in p[:300]], dict(sp, max_tokens=min(sp["max_tokens"], 12))) for p, sp in w6()[:40]]
    monkeypatch.setattr(host_profile, "w6", lambda: small)
    monkeypatch.setattr(host_profile, "fresh", lambda requests, run: requests)
    monkeypatch.setattr(host_profile, "build_checkpoint", lambda model_dir: "demo-random")
    monkeypatch.setattr(host_profile, "W6_MAX_MODEL_LEN", 1024)
    monkeypatch.setattr(host_profile, "LLM", lambda path, max_model_len: LLM(
        path, device="cpu", max_model_len=max_model_len, max_num_batched_tokens=512))

    class HostClockEvent:  # DeviceTimes' CUDA events, timed on the host
        def __init__(self, enable_timing: bool = False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end) -> float:
            return 1e3 * (end.t - self.t)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", HostClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    host_profile.w6_slow_steps("unused", slow_ms=0.0)
    lines = capsys.readouterr().out.splitlines()
    mixed = int(lines[0].split(", ")[1].split()[0])
    slow = [line for line in lines if line.startswith("step ")]
    assert mixed > 5 and len(slow) == mixed
    assert all("_launch_ahead" in line and "num_device_alloc" in line for line in slow)
    assert any("_prepare_prefill" in line for line in slow)
    assert all("device_busy" in line for line in slow)  # each completed batch's own start and end events
