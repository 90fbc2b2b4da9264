"""`benchmarks.common.peak_rss_of`: the child's own peak, not its parent's, and its whole process tree's."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks.common import GpuUtilisation, peak_rss_of, process_tree

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# Holds `mib` MiB of written (so resident) memory for `hold` seconds.
ALLOCATE = "import time; block = bytearray(b'\\x01') * ({mib} * 2**20); time.sleep({hold})"

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def _run_from_large_parent(parent_mib: int, child_mib: int) -> dict:
    """In a fresh parent that first touches `parent_mib` MiB, measure a child that touches `child_mib`."""
    child = [sys.executable, "-c", ALLOCATE.format(mib=child_mib, hold=0.3)]
    script = textwrap.dedent(
        f"""
        import json
        from benchmarks.common import peak_rss_of
        ballast = bytearray(b'\\x01') * ({parent_mib} * 2**20)
        res = peak_rss_of({child!r}, pss_interval_s=0.1)
        print(json.dumps({{k: v for k, v in res.items() if k not in ("stdout", "stderr")}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_child_peak_is_the_childs_not_the_large_parents() -> None:
    res = _run_from_large_parent(parent_mib=600, child_mib=200)
    assert res["returncode"] == 0 and not res["timed_out"]
    # The interpreter itself adds ~10-30 MiB; wait4's ru_maxrss would have said >= 600 here.
    assert 200 <= res["peak_rss_mib"] < 300, res
    assert 200 <= res["tree_peak_rss_mib"] < 300, res
    assert 200 <= res["tree_peak_pss_mib"] <= res["tree_peak_rss_mib"], res
    assert res["samples"] >= 2


def test_tree_peak_counts_grandchildren() -> None:
    grandchild = [sys.executable, "-c", ALLOCATE.format(mib=150, hold=0.5)]
    # A small child whose own child holds 150 MiB: only the tree figure may see it.
    child = [sys.executable, "-c", f"import subprocess; subprocess.run({grandchild!r}, check=True)"]
    res = peak_rss_of(child, pss_interval_s=0.1)
    assert res["returncode"] == 0
    assert res["peak_rss_mib"] < 100, res
    assert res["tree_peak_rss_mib"] >= 150 + res["peak_rss_mib"] * 0.5, res
    assert res["tree_peak_anon_mib"] >= 150, res
    assert res["tree_peak_pss_mib"] >= 150, res
    assert res["tree_max_processes"] == 2
    # The process that held the memory is named first, by its command line.
    assert res["top_processes"][0]["peak_own_mib"] >= 150, res["top_processes"]
    assert "bytearray" in res["top_processes"][0]["name"], res["top_processes"]
    seconds = [t for t, *_ in res["timeline"]]
    assert len(seconds) >= 3 and seconds == sorted(seconds)


def test_shared_memory_is_counted_once_in_pss() -> None:
    # Two processes map the same 120 MiB of written shared memory: RSS counts it twice, PSS once.
    code = textwrap.dedent(
        """
        import mmap, os, time
        block = mmap.mmap(-1, 120 * 2**20)  # anonymous and shared: shmem pages
        for start in range(0, len(block), 2**20):  # in chunks: no 120 MiB temporary on the heap
            block[start : start + 2**20] = b"\\x01" * 2**20
        pid = os.fork()
        if pid == 0:
            sum(block[::4096])  # map every page in the second process too
            time.sleep(0.6)
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    res = peak_rss_of([sys.executable, "-c", code], pss_interval_s=0.1)
    assert res["returncode"] == 0, res["stderr"]
    assert res["tree_peak_rss_mib"] >= 240, res
    # A sample reads the processes one after the other: one caught mid-mapping can skew that sample.
    both_mapped = [(rss, shmem) for _, rss, _, shmem, _ in res["timeline"] if rss >= 240]
    assert both_mapped and 115 <= statistics.median(sh for _, sh in both_mapped) <= 130, res["timeline"]
    assert res["tree_peak_pss_non_shmem_mib"] < 100, res
    # Each process's own peak (PSS less shared memory) is listed, the larger first: neither holds 120.
    top = res["top_processes"]
    assert len(top) == 2 and top[0]["peak_own_mib"] >= top[1]["peak_own_mib"], top
    assert all(p["peak_own_mib"] < 100 for p in top), top


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_timeout_kills_the_child_and_its_tree() -> None:
    code = "import subprocess; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); p.wait()"
    start = time.perf_counter()
    res = peak_rss_of([sys.executable, "-c", code], timeout_s=1.0)
    assert res["timed_out"] and res["returncode"] != 0
    assert time.perf_counter() - start < 10
    grandchild = int(res["stdout"].split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_failing_child_reports_its_exit_code_and_output() -> None:
    res = peak_rss_of([sys.executable, "-c", "import sys; print('out'); sys.exit('boom')"])
    assert res["returncode"] == 1 and not res["timed_out"]
    assert res["stdout"].strip() == "out" and "boom" in res["stderr"]


def test_process_tree_of_a_process_without_children_is_itself() -> None:
    proc = subprocess.Popen(["sleep", "5"])
    try:
        assert process_tree(proc.pid) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer")
def test_gpu_utilisation_is_none_without_cuda() -> None:
    with GpuUtilisation(interval_s=0.01) as gpu:
        time.sleep(0.05)
    assert gpu.result() is None and gpu.values == []
