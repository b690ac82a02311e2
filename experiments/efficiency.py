"""Figure 2 benchmark: time per step and peak memory of AdamW, logits-SAM and full SAM on one model and batch.

    python experiments/efficiency.py --out figures/            # default: Pythia-shaped model on the CPU
    python experiments/efficiency.py --model pythia-2.8b-shaped --device cuda --autocast bf16 --out runs/eff

Each (variant, repetition) runs in a fresh Python subprocess (so peak memory is that variant's alone); the
repetitions are interleaved (rep r runs every variant, in an order rotated by r) so drift in machine load hits
all variants alike. Step time: median over all timed steps of all repetitions (after ``--warmup`` steps per
process, which also allocate the optimizer state). Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
(model, gradients, optimizer state and activations); on CPU the growth of the process's resident-set
high-water mark (Linux VmHWM, reset through /proc/self/clear_refs where allowed, else ru_maxrss) from just
before the model is built to the end of the timed steps — the same quantities, measured by the OS.

Writes DIR/efficiency.json (rewritten after every repetition, so an interrupted run keeps what it measured)
and DIR/figure2.png (figures/figure2.py). Targets (issue 3): logits-sam/adamw time ≤ 1 + (2/3)·head_share
+ 0.02 and memory ≤ 1.05; sam/adamw time ≈ 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dynamics._cli import OneLineErrorParser, finite_float, output_dir, write_json

ROOT = Path(__file__).resolve().parents[1]
MAIN_VARIANTS = ("adamw", "logits-sam", "sam")
DEFAULT_MODEL = "pythia-shaped"
# [ours] Pythia-70m's body (GPT-NeoX, d 512, 6 layers, 8 heads, MLP 2048) with a 2048-token vocabulary, so the
# output layer's share of the parameters (4.9%) is close to Pythia-2.8B's 4.64% (experiments.md) while a step
# stays well under a second on two CPU cores.
PYTHIA_SHAPED = {
    "model_type": "gpt_neox",
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
# Pythia-2.8B's shape (experiments.md: GPT-NeoX, vocab 50304, d 2560; 32 layers, 32 heads, MLP 10240 as in its
# public config) with random weights, for a GPU run without hub access. Head share 4.64%.
PYTHIA_28B_SHAPED = {
    **PYTHIA_SHAPED,
    "hidden_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 10240,
    "vocab_size": 50304,
}
BUILTIN_CONFIGS = {DEFAULT_MODEL: PYTHIA_SHAPED, "pythia-2.8b-shaped": PYTHIA_28B_SHAPED}


# ---------------------------------------------------------------------------------------------- worker side
def _mem_now_and_reset() -> float:
    """Current RSS in MB after resetting the high-water mark (Linux); ru_maxrss in MB where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(key)


def _mem_peak() -> float:
    try:
        return _proc_status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_factory(spec: str, seed: int):
    """A zero-argument callable building the causal LM: from the built-in "pythia-shaped" config, a config JSON
    (random weights), a local checkpoint directory or a preset of dynamics.lm.models. Every import and the
    config are resolved here, so calling the factory allocates the model and nothing else."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if spec in BUILTIN_CONFIGS or path.is_file():
        cfg = dict(BUILTIN_CONFIGS[spec]) if spec in BUILTIN_CONFIGS else json.loads(path.read_text())
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module now

        def build(device):
            torch.manual_seed(seed)
            with torch.device(device):  # initialise in place (a 2.8B model on the GPU directly)
                return model_class(config)

        return build
    from dynamics.lm.models import load_model

    return lambda device: load_model(spec, seed=seed)[0].to(device)


def make_batch(n_pairs: int, seq_len: int, prompt_len: int, vocab: int, seed: int, device) -> dict:
    """Random-token preference batch in the dynamics.lm.perturb layout (no padding), reference log-probs set."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2 * n_pairs, seq_len), generator=gen)
    resp = torch.zeros_like(ids)
    resp[:, prompt_len:] = 1
    ref = -3.0 * (seq_len - prompt_len) + torch.randn(2, n_pairs, generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "response_mask": resp,
        "ref_chosen_logps": ref[0],
        "ref_rejected_logps": ref[1],
    }
    return {k: v.to(device) for k, v in batch.items()}


def _setup_variant(args: argparse.Namespace, variant: str, factory, device):
    """(model, PreferenceStep, batch) for one variant ("adamw", "logits-sam", "sam", "logits-sam:dense", ...)."""
    import torch

    from dynamics.lm.losses import PreferenceObjective
    from dynamics.lm.perturb import PreferenceStep, output_head

    method, _, route = variant.partition(":")
    model = factory(device)
    model.train()
    vocab = output_head(model).weight.shape[0]
    batch = make_batch(args.batch_pairs, args.seq_len, args.prompt_len, vocab, args.seed, device)
    step = PreferenceStep(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-6),
        PreferenceObjective(args.loss, beta=0.1),
        method,
        args.rho,
        route=route or "auto",
        autocast_dtype=torch.bfloat16 if args.autocast == "bf16" else None,
    )
    return model, step, batch


def _worker_context(args: argparse.Namespace):
    """(torch.device, whether it is CUDA, model factory) of a worker process; sets torch's CPU threads."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, device.type == "cuda", model_factory(args.model, args.seed)


def _timed(step, batch, cuda: bool, device) -> tuple[float, float, dict]:
    """(wall seconds, process CPU seconds, metrics) of one step."""
    import torch

    if cuda:
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = step(batch)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, metrics


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this fresh process: build, warm up, time ``args.steps`` steps; times and peak memory."""
    import torch

    from dynamics.lm.perturb import choose_route, output_head

    device, cuda, factory = _worker_context(args)
    torch.zeros(8).sum()  # initialise the allocator before the baseline
    mem0 = _mem_now_and_reset()
    model, step, batch = _setup_variant(args, args.worker, factory, device)
    head = output_head(model)
    total = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, metrics = [], [], {}
    for i in range(args.warmup + args.steps):
        wall, cpu, metrics = _timed(step, batch, cuda, device)
        if i >= args.warmup:
            times.append(wall)
            cpu_times.append(cpu)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _mem_peak() - mem0
    n_tokens = batch["input_ids"].numel()
    n_resp = int(batch["response_mask"][:, 1:].sum())
    v, d = head.weight.shape
    return {
        "variant": args.worker,
        "step_times_s": times,
        "cpu_times_s": cpu_times,
        "peak_mem_mb": peak,
        "head_share": head.weight.numel() / total,
        "n_params": total,
        "hidden": d,
        "vocab": v,
        "tokens": n_tokens,
        "auto_route": choose_route(n_tokens, n_resp, v, d),
        "route_used": {0.0: "none", 1.0: "dense", 2.0: "gram"}.get(metrics.get("route", 0.0), "none"),
    }


def run_timing(args: argparse.Namespace) -> dict[str, Any]:
    """All main variants in one process, each with its own identically initialised model; ``args.reps``
    rounds, each running one step of every variant in an order rotated by the round (step-level interleaving,
    so load changes on a shared machine hit every variant alike). Returns the per-variant step times."""
    device, cuda, factory = _worker_context(args)
    setups = {v: _setup_variant(args, v, factory, device) for v in MAIN_VARIANTS}
    for _ in range(max(args.warmup, 1)):
        for _model, step, batch in setups.values():
            step(batch)
    times: dict[str, dict[str, list[float]]] = {
        v: {"step_times_s": [], "cpu_times_s": []} for v in MAIN_VARIANTS
    }
    order = list(MAIN_VARIANTS)
    for r in range(args.reps):
        k = r % len(order)
        for v in order[k:] + order[:k]:
            _model, step, batch = setups[v]
            wall, cpu, _ = _timed(step, batch, cuda, device)
            times[v]["step_times_s"].append(wall)
            times[v]["cpu_times_s"].append(cpu)
    return {"variant": "timing", "times": times}


# (tokens N, vocab V, hidden d): this benchmark's head at three batch sizes, and a Pythia-2.8B-wide head (d 2560).
GRAM_CASES = ((32, 2048, 512), (128, 2048, 512), (512, 2048, 512), (64, 8192, 2560), (256, 8192, 2560))


def run_gram_micro(args: argparse.Namespace) -> dict[str, Any]:
    """Time of the logits-SAM head work (perturbed logits forward + backward to h and W) by route, per case.

    The rows of G_Z for the first quarter of the tokens are zero (prompt tokens), as in a preference batch.
    Median over ``max(3, steps)`` interleaved repetitions after one warm-up of each route.
    """
    import torch

    from dynamics.lm.perturb import choose_route, perturbed_head_logits

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n, v, d in GRAM_CASES:
        h = torch.randn(n, d, generator=gen).requires_grad_(True)
        w = (0.02 * torch.randn(v, d, generator=gen)).requires_grad_(True)
        g = torch.randn(n, v, generator=gen)
        g[: n // 4] = 0.0
        cot = torch.randn(n, v, generator=gen)
        times: dict[str, list[float]] = {"dense": [], "gram": []}
        for rep in range(1 + max(3, args.steps)):
            for route in ("dense", "gram") if rep % 2 == 0 else ("gram", "dense"):
                h.grad = w.grad = None
                t0 = time.perf_counter()
                z, _ = perturbed_head_logits(h, w, None, g, args.rho, route=route)
                z.backward(cot)
                if rep:
                    times[route].append(time.perf_counter() - t0)
        dense, gram = statistics.median(times["dense"]), statistics.median(times["gram"])
        rows.append(
            {
                "tokens": n,
                "vocab": v,
                "hidden": d,
                "dense_s": dense,
                "gram_s": gram,
                "gram/dense": gram / dense,
                "auto_route": choose_route(n, n - n // 4, v, d),
            }
        )
    return {"variant": "gram-micro", "cases": rows}


# ---------------------------------------------------------------------------------------------- parent side
def _worker_argv(args: argparse.Namespace, variant: str) -> list[str]:
    keep = [
        "model",
        "device",
        "autocast",
        "batch_pairs",
        "seq_len",
        "prompt_len",
        "steps",
        "reps",
        "warmup",
        "rho",
        "loss",
        "seed",
        "threads",
    ]
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    for k in keep:
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return argv


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Run one variant in a fresh subprocess; its JSON result is the last line of its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(_worker_argv(args, variant), capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(
    args: argparse.Namespace,
    runs: dict[str, list[dict]],
    gram_micro: dict | None = None,
    timing: dict | None = None,
) -> dict[str, Any]:
    """The efficiency.json document from what was measured so far: ``runs`` (variant -> fresh-process results,
    memory and per-process times), optional ``timing`` (the interleaved timing process) and ``gram_micro``."""

    def samples(v, key):
        if timing is not None:
            return timing["times"][v][key]
        return [t for r in runs[v] for t in r[key]]

    def med_time(v):
        return statistics.median(samples(v, "step_times_s"))

    def med_cpu(v):
        return statistics.median(samples(v, "cpu_times_s"))

    def min_time(v):
        return min(samples(v, "step_times_s"))

    def med_mem(v):
        return statistics.median(r["peak_mem_mb"] for r in runs[v])

    first = next(iter(runs.values()))[0]
    variants = {
        v: {
            "step_time_s": med_time(v),
            "cpu_time_s": med_cpu(v),
            "min_step_time_s": min_time(v),
            "peak_mem_mb": med_mem(v),
            "reps": len(runs[v]),
            "step_times_s": samples(v, "step_times_s"),
            "peak_mem_mb_per_rep": [r["peak_mem_mb"] for r in runs[v]],
            "route": runs[v][-1]["route_used"],
        }
        for v in MAIN_VARIANTS
        if v in runs
    }
    ratios = {}
    for v in ("logits-sam", "sam"):
        if v in variants and "adamw" in variants:
            ratios[f"{v}/adamw"] = {
                "time": variants[v]["step_time_s"] / variants["adamw"]["step_time_s"],
                "cpu_time": variants[v]["cpu_time_s"] / variants["adamw"]["cpu_time_s"],
                "min_time": variants[v]["min_step_time_s"] / variants["adamw"]["min_step_time_s"],
                "memory": variants[v]["peak_mem_mb"] / variants["adamw"]["peak_mem_mb"],
            }
    head_share = first["head_share"]
    doc: dict[str, Any] = {
        "head_share": head_share,
        "config": {
            "model": args.model,
            "device": args.device,
            "autocast": args.autocast,
            "batch_pairs": args.batch_pairs,
            "seq_len": args.seq_len,
            "prompt_len": args.prompt_len,
            "tokens": first["tokens"],
            "hidden": first["hidden"],
            "vocab": first["vocab"],
            "n_params": first["n_params"],
            "loss": args.loss,
            "rho": args.rho,
            "steps_per_rep": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "seed": args.seed,
            "optimizer": "AdamW(lr=1e-6)",
            "memory_measure": "torch.cuda.max_memory_allocated"
            if args.device.startswith("cuda")
            else "growth of VmHWM (resident-set high-water mark) from before the model is built",
            "timing": args.timing,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "variants": variants,
        "ratios": ratios,
    }
    if "logits-sam/adamw" in ratios:
        bound = 1 + (2 / 3) * head_share + 0.02
        doc["targets"] = {
            "logits-sam/adamw time bound": bound,
            "logits-sam/adamw time met": ratios["logits-sam/adamw"]["time"] <= bound,
            "logits-sam/adamw memory met": ratios["logits-sam/adamw"]["memory"] <= 1.05,
            "sam/adamw time (about 2)": ratios.get("sam/adamw", {}).get("time"),
        }
    if gram_micro is not None:
        doc["gram_vs_dense"] = {
            "what": "logits-SAM head work (perturbed logits forward + backward), median seconds by route",
            "full_step_route": variants.get("logits-sam", {}).get("route"),
            "cases": gram_micro["cases"],
        }
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="figures", help="output directory for efficiency.json and figure2.png")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'pythia-shaped' (default), 'pythia-2.8b-shaped' (GPU), a preset of dynamics.lm.models, a config "
        "JSON with model_type, "
        "or a local checkpoint directory",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument(
        "--autocast", choices=["none", "bf16"], default="none", help="bf16 autocast for the forward passes"
    )
    p.add_argument("--batch-pairs", type=int, default=2, help="preference pairs per step (2B sequences)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument(
        "--prompt-len", type=int, default=16, help="prompt tokens per sequence (the rest is response)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=20,
        help="interleaved timing: rounds of one step per variant; per-process timing: fresh processes per variant",
    )
    p.add_argument(
        "--timing",
        choices=["interleaved", "per-process"],
        default=None,
        help="interleaved (default on CPU): one process alternates the variants step by step, robust to a "
        "shared machine; per-process (default on CUDA): the times of the fresh memory processes",
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps per fresh (memory) process")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per subprocess (allocate optimizer state)"
    )
    p.add_argument("--rho", type=finite_float, default=1e-3, help="SAM radius for logits-sam and sam")
    p.add_argument("--loss", default="sigmoid", help="preference loss (dynamics.lm.losses.LOSSES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per subprocess (1: robust on a shared machine)",
    )
    p.add_argument("--no-gram", action="store_true", help="skip the Gram-vs-dense head micro-benchmark")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from dynamics.lm.losses import LOSSES

    for name in ("batch_pairs", "seq_len", "reps", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 1 <= args.prompt_len < args.seq_len:
        p.error(
            f"--prompt-len must satisfy 1 <= prompt-len < seq-len = {args.seq_len}, got {args.prompt_len}"
        )
    if args.loss not in LOSSES:
        p.error(f"--loss must be one of {sorted(LOSSES)}, got {args.loss!r}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # runtime unavailability, not a usage error: exit 1
            p.exit(1, f"{p.prog}: --device {args.device}: no CUDA device is available here\n")
    if args.model not in BUILTIN_CONFIGS and not Path(args.model).exists():
        from dynamics.lm.models import PRESETS

        if args.model not in PRESETS:
            p.error(
                f"--model {args.model!r}: not {' or '.join(BUILTIN_CONFIGS)}, a preset ({', '.join(PRESETS)}), a config JSON "
                "or a checkpoint directory"
            )
    if Path(args.model).is_file():
        try:
            cfg = json.loads(Path(args.model).read_text())
            model_type = cfg["model_type"]
        except (ValueError, KeyError, TypeError):
            p.error(f"--model {args.model}: expected a JSON config with a 'model_type' field")
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            p.error(f"--model {args.model}: unknown model_type {model_type!r} (expected a transformers one)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        workers = {"gram-micro": run_gram_micro, "timing": run_timing}
        print(json.dumps(workers.get(args.worker, run_worker)(args)))
        return 0
    validate(parser, args)
    out = output_dir(parser, args.out)
    try:
        return run_benchmark(parser, args, out)
    except OSError as err:  # e.g. the disk filled up mid-run: the efficiency.json already written stays
        parser.exit(1, f"{parser.prog}: cannot write the results: {err}\n")


def run_benchmark(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> int:
    """Measure every variant (fresh processes), rewriting OUT/efficiency.json after each; then draw Figure 2."""
    if args.timing is None:
        args.timing = "per-process" if args.device.startswith("cuda") else "interleaved"
    variants = list(MAIN_VARIANTS)
    runs: dict[str, list[dict]] = {}
    timing = gram_micro = None

    def measure(variant: str) -> dict:
        try:
            return run_variant(args, variant)
        except RuntimeError as err:
            parser.exit(1, f"efficiency.py: {err}\n")

    def save() -> dict:
        doc = summarize(args, runs, gram_micro, timing)
        write_json(out / "efficiency.json", doc)
        return doc

    process_reps = args.reps if args.timing == "per-process" else 1
    for rep in range(process_reps):
        k = rep % len(variants)
        for variant in variants[k:] + variants[:k]:  # rotate the order each repetition
            result = measure(variant)
            runs.setdefault(variant, []).append(result)
            print(
                f"fresh process {rep + 1}/{process_reps} {variant:11s} step "
                f"{statistics.median(result['step_times_s']):.4f} s  peak {result['peak_mem_mb']:.1f} MB",
                flush=True,
            )
        doc = save()
    if args.timing == "interleaved":
        timing = measure("timing")
        doc = save()
        print(f"interleaved timing: {args.reps} rounds of {', '.join(variants)}", flush=True)
    if not args.no_gram:
        gram_micro = measure("gram-micro")
        doc = save()
    sys.path.insert(0, str(ROOT))
    from figures.figure2 import plot_efficiency

    plot_efficiency(doc, out / "figure2.png")
    for name, r in doc["ratios"].items():
        print(
            f"{name}: time {r['time']:.3f} (median wall), {r['cpu_time']:.3f} (median CPU), {r['min_time']:.3f} "
            f"(min wall); memory {r['memory']:.3f}"
        )
    if "targets" in doc:
        print(json.dumps(doc["targets"]))
    for c in doc.get("gram_vs_dense", {}).get("cases", []):
        print(
            f"head work N={c['tokens']} V={c['vocab']} d={c['hidden']}: dense {c['dense_s'] * 1e3:.1f} ms, "
            f"gram {c['gram_s'] * 1e3:.1f} ms (gram/dense {c['gram/dense']:.2f}, auto picks {c['auto_route']})"
        )
    print(f"wrote {out / 'efficiency.json'} and {out / 'figure2.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
