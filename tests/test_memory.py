"""Memory: converting a large conv allocates a small multiple of its weights.

A 1024 -> 1024 3x3 conv (36 MiB of float32 weights) is converted in a fresh
Python process, once per form, and the peak resident memory that each conversion
adds is measured.

How it is measured, and why: ``tracemalloc`` does not see torch's allocations
(they bypass Python's allocator) and torch has no allocator statistics for CPU
tensors; the process's peak RSS (``ru_maxrss``) cannot be reset, so it would
include the import. On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets
the peak (``VmHWM``) to the current RSS, so the peak read after a conversion is
what that conversion added. glibc's malloc is told to map every block above 64
KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the process
and a later one cannot hide in memory freed earlier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUMMARY_LINES

ROOT = Path(__file__).resolve().parents[1]
# Peak memory a conversion may add, in multiples of the conv's float32 weights: the
# float64 copy of the kernel alone is 2, one kernel-sized temporary 2 more.
BOUND = 10

SCRIPT = r"""
import json, sys, torch
from torch import nn
torch.set_num_threads(1)
from dwconvert.layers import FORM_CLASSES

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

torch.manual_seed(0)
conv = nn.Conv2d(1024, 1024, 3, padding=1)
FORM_CLASSES["cp"].from_conv(nn.Conv2d(8, 8, 3), 2, cp_iters=1)  # import TensorLy first
results = {"weights": conv.weight.numel() * conv.weight.element_size()}
for form, rank in json.loads(sys.argv[1]):
    reset()
    before = peak()
    module = FORM_CLASSES[form].from_conv(conv, rank, cp_iters=2)
    results[f"{form}:{rank}"] = peak() - before
    del module
print(json.dumps(results))
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _can_reset_peak(),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_large_conv_converts_within_a_small_multiple_of_its_weights():
    # Ranks near a quarter of the MACs for the SVD forms, and a CP rank wider than a mode.
    conversions = [["dw-pw", 4], ["pw-dw", 4], ["cp", 64], ["cp", 300]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(conversions)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    weights = results.pop("weights")
    ratios = {name: grown / weights for name, grown in results.items()}
    assert len(ratios) == len(conversions)
    SUMMARY_LINES["memory"] = ("memory: peak added converting a 1024x1024 3x3 conv, in float32 "
                               "weights: " + ", ".join(f"{k} {v:.1f}" for k, v in ratios.items()))
    assert all(ratio <= BOUND for ratio in ratios.values()), \
        f"peak memory added, in float32 weights ({weights / 2**20:.0f} MiB): {ratios}"
