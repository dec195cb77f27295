"""Benchmark of the PGM prototype selection (Alg. 1): fast Gram / rank-one form vs the direct form.

    python benchmarks/bench_pgm.py [--direct-max-gb 6] [--repeats 3]

The direct form is written like the authors' code: every step materialises the residual tensors of ALL
candidates, (candidates x N x D), O(K N^2 D) time and O(N^2 D) memory (one space at a time here, to halve
its peak). It is skipped when its largest tensor would not fit in ``--direct-max-gb`` or in half of the
available memory. Every case runs in a fresh child process, so that the peak resident memory (VmHWM,
reset through /proc/self/clear_refs after the features are built) belongs to the selection alone; it is
reported as a ratio to the features' own size (teacher + student, float32); the memory runs use a fixed
glibc mmap threshold so that freed heap memory cannot hide allocations.

The children run with OMP_WAIT_POLICY=PASSIVE unless the variable is already set: on a shared, oversubscribed
CPU the default spin-waiting of the OpenMP threads makes every small parallel op wait for a descheduled
sibling thread (we saw the fast form 25x slower at N = 2000 with 2 threads under load 4, and no slower
with PASSIVE than with 1 thread). It changes nothing on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkd.distill.global_kd.pgm import select_prototypes  # noqa: E402

K = 10
LAM = 10.0


def make_features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered teacher features and a noisy linear image of them as student features (float32)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(50, d, generator=g)
    labels = torch.randint(0, 50, (n,), generator=g)
    ft = centers[labels] + 0.5 * torch.randn(n, d, generator=g)
    fs = ft @ (torch.randn(d, d, generator=g) / d**0.5) + 0.3 * torch.randn(n, d, generator=g)
    return ft, fs


def direct_pgm(feat_t: torch.Tensor, feat_s: torch.Tensor, k: int, lam: float) -> list[int]:
    """Alg. 1 as the authors wrote it: residual tensors of every candidate, (candidates x N x D), per step."""
    ft, fs = F.normalize(feat_t, dim=1), F.normalize(feat_s, dim=1)
    rt, rs = ft.clone(), fs.clone()
    nt, ns = (ft * ft).sum(1), (fs * fs).sum(1)
    den = nt * ns + lam * (nt + ns)
    picks = []
    for _ in range(k):
        pt, ps = ft @ rt.T, fs @ rs.T  # (candidates, N): <r_i, g_k>
        a = ((ns + lam)[:, None] * pt + lam * ps) / den[:, None]  # Eq. 5
        b = ((nt + lam)[:, None] * ps + lam * pt) / den[:, None]
        err = a[:, :, None] * ft[:, None, :]  # (candidates, N, Dt)
        err.sub_(rt[None])
        cost = err.square_().sum((1, 2))
        del err
        err = b[:, :, None] * fs[:, None, :]  # (candidates, N, Ds)
        err.sub_(rs[None])
        cost += err.square_().sum((1, 2))
        del err
        cost += lam * ((a - b) ** 2).sum(1)  # Eq. 4 (the penalty of earlier picks is the same for all)
        j = int(torch.argmin(cost))
        rt = rt - a[j][:, None] * ft[j][None, :]  # Eq. 3
        rs = rs - b[j][:, None] * fs[j][None, :]
        picks.append(j)
    return picks


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(case: dict) -> dict:
    ft, fs = make_features(case["n"], case["d"], seed=case["seed"])
    feat_bytes = ft.nbytes + fs.nbytes
    if case["method"] == "fast":
        select_prototypes(ft[:64], fs[:64], k=2)  # load the BLAS kernels before measuring memory
    rss0 = _status_kb("VmRSS")
    peak_reset = _reset_peak()
    t0 = time.perf_counter()
    if case["method"] == "fast":
        picks = select_prototypes(ft, fs, k=K, lam=LAM, normalize=case["normalize"]).indices.tolist()
    else:
        picks = direct_pgm(ft, fs, K, LAM)
    first = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") - rss0
    times = [first]
    for _ in range(case["repeats"] - 1):
        t0 = time.perf_counter()
        select_prototypes(ft, fs, k=K, lam=LAM, normalize=case["normalize"])
        times.append(time.perf_counter() - t0)
    return {
        "picks": picks,
        "time_s": min(times),
        "times_s": times,
        "peak_bytes": peak_kb * 1024,
        "feat_bytes": feat_bytes,
        "peak_reset": peak_reset,
    }


def spawn(case: dict, fixed_mmap_threshold: bool = False) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if fixed_mmap_threshold:
        # Every buffer above 128 KiB gets fresh pages, so that the peak RSS is not hidden by glibc reusing
        # heap memory freed while the features were built (its dynamic mmap threshold reaches 32 MiB).
        # Fresh pages cost page faults, so times are taken in another child with the default allocator.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True, check=False,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"benchmark child failed for {case}:\n{proc.stderr[-3000:]}")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) * 1024




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--direct-max-gb", type=float, default=6.0, help="skip the direct form above this")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast form (min is kept)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; "
          f"K = {K}, lam = {LAM}, float32")
    header = (f"{'N':>7} {'D':>5} {'norm':>5} | {'fast s':>8} {'fast peak/feat':>14} | {'direct s':>9} "
              f"{'direct peak/feat':>16} | {'speed-up':>9} {'same picks':>10}")
    print(header)
    print("-" * len(header))
    rows = [
        (500, 256, True, True),
        (1000, 256, True, True),
        (2000, 256, True, True),
        (20_000, 1024, True, False),
        (100_000, 256, True, False),
        (100_000, 256, False, False),
    ]
    for n, d, normalize, with_direct in rows:
        case = {"method": "fast", "n": n, "d": d, "seed": 0, "repeats": args.repeats, "normalize": normalize}
        fast = spawn(case)
        fast_mem = spawn({**case, "repeats": 1}, fixed_mmap_threshold=True)
        ratio = fast_mem["peak_bytes"] / fast_mem["feat_bytes"]
        line = f"{n:>7} {d:>5} {'yes' if normalize else 'no':>5} | {fast['time_s']:>8.4f} {ratio:>14.2f} | "
        direct_bytes = n * n * d * 4  # the (candidates x N x D) float32 residual tensor
        if not with_direct:
            line += f"{'-':>9} {'-':>16} | {'-':>9} {'-':>10}"
        elif direct_bytes > min(args.direct_max_gb * 2**30, 0.5 * mem_available_bytes()):
            line += f"{'skipped':>9} {f'needs {direct_bytes / 2**30:.1f} GiB':>16} | {'-':>9} {'-':>10}"
        else:
            # One run with the default allocator; its peak is dominated by the (candidates x N x D) buffers,
            # which glibc mmaps anyway.
            direct = spawn({"method": "direct", "n": n, "d": d, "seed": 0, "repeats": 1, "normalize": True})
            same = "yes" if direct["picks"] == fast["picks"] else "NO"
            line += (f"{direct['time_s']:>9.2f} {direct['peak_bytes'] / direct['feat_bytes']:>16.2f} | "
                     f"{direct['time_s'] / fast['time_s']:>8.0f}x {same:>10}")
        print(line, flush=True)
        if not fast_mem["peak_reset"]:
            print("  (peak RSS could not be reset; peak/feat is an upper bound)")
    print("peak/feat = peak resident memory added by the selection / bytes of the teacher + student features; "
          "fast s = best of the repeats, direct s = one run; norm = L2-normalise first (the direct form always "
          "does)")


if __name__ == "__main__":
    main()
