"""Synthetic H&E generator speed: milliseconds per tile on one CPU core (target: 256x256 under 50 ms)."""
import os, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
import cv2
cv2.setNumThreads(1)
import numpy as np
from nucbook.data.synth import synth_tile

def bench(size, n):
    synth_tile(0, size=size)  # warm-up
    t = []
    for i in range(n):
        t0 = time.perf_counter(); synth_tile(i, size=size); t.append(time.perf_counter() - t0)
    return 1000 * np.median(t), 1000 * np.percentile(t, 90)

if __name__ == '__main__':
    print(f"{'tile':>10} {'median ms':>10} {'p90 ms':>8}")
    for size, n in [(256, 100), (512, 30), (1000, 10)]:
        med, p90 = bench(size, n)
        flag = ('  (target < 50 ms: ' + ('met' if med < 50 else 'MISSED') + ')') if size == 256 else ''
        print(f'{size}x{size:<5} {med:10.1f} {p90:8.1f}{flag}')
