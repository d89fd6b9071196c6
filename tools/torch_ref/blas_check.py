#!/usr/bin/python3
"""Which BLAS does torch use here, and how fast is a 1024x1024x1024 float32 matmul?

  /usr/bin/python3 tools/torch_ref/blas_check.py [--reps 10] [--n 1024] [--threads 1,2]

Prints the BLAS library torch's libtorch_cpu.so resolved (from /proc/self/maps), the
OpenBLAS configuration if it is OpenBLAS, the OPENBLAS_* environment, and the best time
and GFLOP/s of `a @ b` (n x n x n) for 1 and 2 threads (or --threads) (torch.set_num_threads and
openblas_set_num_threads set alike). ~5 GFLOP/s or less means the reference (netlib)
BLAS: see README.md, "BLAS". The last line is machine-readable:
"result n=N threads=T gflops=G ..." (one pair per thread count; bench/compare_torch.sh).
"""

import argparse
import ctypes
import os
import time

import torch


def blas_libs():
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if any(k in path for k in ("blas", "lapack", "mkl")):
                libs.add(os.path.realpath(path))
    return sorted(libs)


def openblas():
    try:
        ob = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
    ob.openblas_get_config.restype = ctypes.c_char_p
    ob.openblas_get_corename.restype = ctypes.c_char_p
    return ob


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    args = ap.parse_args()
    n = args.n
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # loads the BLAS
    print(f"torch {torch.__version__}; BLAS libraries mapped: {', '.join(blas_libs()) or 'none'}")
    ob = openblas()
    if ob:
        print(f"OpenBLAS: {ob.openblas_get_config().decode()}, core {ob.openblas_get_corename().decode()}")
    else:
        print("OpenBLAS not loaded (reference BLAS or another library)")
    env = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS") or k.endswith("NUM_THREADS")}
    print(f"environment: {env or 'no OPENBLAS_* / *_NUM_THREADS variables'}")
    res = []
    for nt in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(nt)
        if ob:
            ob.openblas_set_num_threads(nt)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        gf = 2 * n ** 3 / best / 1e9
        print(f"threads {nt}: best of {args.reps} {best * 1e3:8.1f} ms  {gf:6.1f} GFLOP/s")
        res.append(f"threads={nt} gflops={gf:.2f}")
    print(f"result n={n} {' '.join(res)}")


if __name__ == "__main__":
    main()
