"""What the Python benches share (`bench_onnxruntime.py`, `bench_mass.py`): timing a run
and drawing the reference masks, so that onnxruntime and the reference PyTorch code are
timed the same way on the same inputs. Needs numpy only.
"""

import statistics
import time

import numpy as np


def timed(run, runs):
    """Seconds of the first call, the median of `runs` more (NaN for none), and the last output."""
    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) if times else float("nan"), out


def balls(k, patch):
    """One binary ball per class (radius patch/4), centres moved per class, [1, K, D, H, W] f32."""
    d, h, w = patch
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    r2 = (min(patch) / 4.0) ** 2
    masks = np.zeros((1, k, d, h, w), np.float32)
    for c in range(k):
        masks[0, c] = ((z - (d // 2 + c % 3)) ** 2 + (y - h // 2) ** 2 + (x - w // 2) ** 2) <= r2
    return masks
