"""Benchmarks, one function each, one printed line each: python bench.py [name ...] (no name: all)."""
import sys
import time

import torch


def timed(fn, warmup=1, iters=3):
    """Best wall time of fn() over `iters` calls after `warmup` calls, in seconds (best: least disturbed run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_fid():
    """Images/s of FID feature extraction: the InceptionV3 forward on 299x299 images, on CPU."""
    from fid import InceptionV3
    torch.manual_seed(0)
    net = InceptionV3().eval()  # random weights: same speed as the released ones, which cannot be downloaded here
    batch = 8
    x = torch.rand(batch, 3, 299, 299)
    with torch.inference_mode():
        dt = timed(lambda: net(x))
    return (f"fid: {batch / dt:.2f} images/s ({1000 * dt / batch:.0f} ms/image), InceptionV3 pool3 features, "
            f"cpu, batch {batch}, 299x299 float32, {torch.get_num_threads()} threads")


BENCHMARKS = {"fid": bench_fid}


def main(names):
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    for name in names or BENCHMARKS:
        print(BENCHMARKS[name](), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
