"""Vocabulary-scale spectrum benchmark of H_z = diag(p) − ppᵀ (issue 6): accuracy vs dense eigh, speed, memory.

    python experiments/spectrum.py --out figures/

writes OUT/spectrum.json (written again after each section, so a stopped run keeps what it measured):

    {"dense_check": {"V", "max_eigenvalue_error", "max_eigenvector_residual"},
     "speedup_vs_dense": {"V", "ratio", "full_spectrum_ratio"},
     "top16": {"50257": {"time_s", "peak_mem_mb"}, "256000": {...}}}

and OUT/spectrum_config.json (the resolved flags, what each number measures, and the raw times behind the
speed-up ratios). Measurements:
- dense_check: on a peaked Zipf-like p (∝ rank^-1.1) and a flat p (softmax of 0.01·N(0,1)) at V = --dense-v,
  the top-k and the full structured spectra against numpy eigh of the dense matrix; eigenvalue error is the max
  absolute difference of sorted eigenvalues, residual is max ‖H_z v − λ v‖₂ (dense H_z) over all computed pairs.
- speedup_vs_dense: at V = --speed-v (Zipf-like p), min wall time over --dense-repeats of numpy.linalg.eigh on the
  pre-formed dense H_z, divided by the min over --repeats of top_modes(p, k) (ratio) and of full_spectrum(p)
  (full_spectrum_ratio). Same process, one after the other.
- topK: at each V in --top-v, min wall time over --repeats of top_modes(p, k) on a Zipf-like p, and the peak
  memory that call adds (tracemalloc peak minus the traced memory before the call; numpy allocations are
  traced; this includes the returned (V, k) eigenvectors but not p itself).
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dynamics._cli import OneLineErrorParser, output_dir, write_json
from dynamics.logit_space import logit_hessian
from dynamics.spectrum import full_spectrum, near_flat_probs, top_modes, zipf_probs


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _peak_added_mb(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - base) / 2**20


def _dense_check(size: int, k: int, seed: int) -> dict:
    eig_err = 0.0
    residual = 0.0
    for p in (zipf_probs(size, seed=seed), near_flat_probs(size, seed=seed)):
        dense = logit_hessian(p)
        reference = np.linalg.eigh(dense)[0]
        top_values, top_vectors = top_modes(p, k)
        all_values, all_vectors = full_spectrum(p)
        eig_err = max(
            eig_err,
            float(np.max(np.abs(np.sort(all_values) - reference))),
            float(np.max(np.abs(top_values - reference[::-1][:k]))),
        )
        for values, vectors in ((top_values, top_vectors), (all_values, all_vectors)):
            res = np.linalg.norm(dense @ vectors - vectors * values, axis=0)
            residual = max(residual, float(res.max()))
    return {"V": size, "max_eigenvalue_error": eig_err, "max_eigenvector_residual": residual}


def _speedup(size: int, k: int, repeats: int, dense_repeats: int, seed: int) -> tuple[dict, dict]:
    p = zipf_probs(size, seed=seed)
    dense = logit_hessian(p)
    top_modes(p, k)  # warm-up (imports, allocator)
    dense_time = _best_time(lambda: np.linalg.eigh(dense), dense_repeats)
    top_time = _best_time(lambda: top_modes(p, k), repeats)
    full_time = _best_time(lambda: full_spectrum(p), max(1, min(repeats, dense_repeats + 1)))
    result = {"V": size, "ratio": dense_time / top_time, "full_spectrum_ratio": dense_time / full_time}
    return result, {"dense_eigh_s": dense_time, "top_modes_s": top_time, "full_spectrum_s": full_time}


def _top_scale(size: int, k: int, repeats: int, seed: int) -> dict:
    p = zipf_probs(size, seed=seed)
    top_modes(p, k)  # warm-up
    time_s = _best_time(lambda: top_modes(p, k), repeats)
    return {"time_s": time_s, "peak_mem_mb": _peak_added_mb(lambda: top_modes(p, k))}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures/)")
    parser.add_argument("--dense-v", type=int, default=2048, help="V of the accuracy check vs dense eigh")
    parser.add_argument("--speed-v", type=int, default=4096, help="V of the speed comparison vs dense eigh")
    parser.add_argument(
        "--top-v", type=int, nargs="+", default=[50257, 256000], help="vocabulary sizes timed for the top-k"
    )
    parser.add_argument("--k", type=int, default=16, help="number of top modes (default 16)")
    parser.add_argument("--repeats", type=int, default=20, help="timing repeats of the structured solvers")
    parser.add_argument("--dense-repeats", type=int, default=2, help="timing repeats of dense eigh")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test distributions")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except OSError as err:  # e.g. the disk filled up or the folder vanished mid-run: what was written stays
        parser.exit(1, f"{parser.prog}: cannot write the results: {err}\n")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Validate the flags (usage errors exit 2), then measure, rewriting OUT/spectrum.json after each section."""
    if args.k < 1:
        parser.error(f"--k: expected a positive integer, got {args.k}")
    for name in ("dense_v", "speed_v"):
        if getattr(args, name) < args.k + 2:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= k + 2 = {args.k + 2}")
    if any(size < args.k + 2 for size in args.top_v):
        parser.error(f"--top-v: expected integers >= k + 2 = {args.k + 2}")
    if args.repeats < 1 or args.dense_repeats < 1:
        parser.error("--repeats/--dense-repeats: expected positive integers")
    output_dir(parser, args.out)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    config["measures"] = __doc__.split("Measurements:\n", 1)[1].strip()
    config_path = args.out / "spectrum_config.json"
    write_json(config_path, config, ensure_ascii=False)

    results: dict = {}
    results["dense_check"] = _dense_check(args.dense_v, args.k, args.seed)
    write_json(args.out / "spectrum.json", results)
    results["speedup_vs_dense"], raw_times = _speedup(
        args.speed_v, args.k, args.repeats, args.dense_repeats, args.seed
    )
    write_json(args.out / "spectrum.json", results)
    config["speedup_raw_times_s"] = raw_times
    write_json(config_path, config, ensure_ascii=False)
    top_key = f"top{args.k}"
    results[top_key] = {}
    for size in args.top_v:
        results[top_key][str(size)] = _top_scale(size, args.k, min(args.repeats, 5), args.seed)
        write_json(args.out / "spectrum.json", results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
