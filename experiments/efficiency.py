"""Figure 2 benchmark: time per step and peak memory of AdamW, logits-SAM and full SAM on one model and batch.

    python experiments/efficiency.py --out figures/            # default: Pythia-shaped model on the CPU
    python experiments/efficiency.py --model pythia-2.8b --device cuda --autocast bf16 --out runs/eff

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

ROOT = Path(__file__).resolve().parents[1]
MAIN_VARIANTS = ("adamw", "logits-sam", "sam")
GRAM_VARIANTS = ("logits-sam:dense", "logits-sam:gram")
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
    if spec == DEFAULT_MODEL or path.is_file():
        cfg = dict(PYTHIA_SHAPED) if spec == DEFAULT_MODEL else json.loads(path.read_text())
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module now

        def build():
            torch.manual_seed(seed)
            return model_class(config)

        return build
    from dynamics.lm.models import load_model

    return lambda: load_model(spec, seed=seed)[0]


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


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: build, warm up, time ``args.steps`` steps; return times and peak memory."""
    import torch

    from dynamics.lm.losses import PreferenceObjective
    from dynamics.lm.perturb import PreferenceStep, choose_route, output_head

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    method, _, route = args.worker.partition(":")
    factory = model_factory(args.model, args.seed)
    torch.zeros(8).sum()  # initialise the allocator before the baseline
    mem0 = _mem_now_and_reset()
    model = factory().to(device)
    model.train()
    head = output_head(model)
    total = sum(p.numel() for p in model.parameters())
    head_share = head.weight.numel() / total
    batch = make_batch(
        args.batch_pairs, args.seq_len, args.prompt_len, head.weight.shape[0], args.seed, device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    step = PreferenceStep(
        model,
        opt,
        PreferenceObjective(args.loss, beta=0.1),
        method,
        args.rho,
        route=route or "auto",
        autocast_dtype=autocast,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, metrics = [], {}
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        metrics = step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _mem_peak() - mem0
    n_tokens = batch["input_ids"].numel()
    n_resp = int(batch["response_mask"][:, 1:].sum())
    d = head.weight.shape[1]
    return {
        "variant": args.worker,
        "step_times_s": times,
        "peak_mem_mb": peak,
        "head_share": head_share,
        "n_params": total,
        "hidden": d,
        "vocab": head.weight.shape[0],
        "tokens": n_tokens,
        "auto_route": choose_route(n_tokens, n_resp, head.weight.shape[0], d),
        "route_used": {0.0: "none", 1.0: "dense", 2.0: "gram"}.get(metrics.get("route", 0.0), "none"),
        "loss_clean": metrics.get("loss_clean"),
        "loss_perturbed": metrics.get("loss_perturbed"),
    }


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


def summarize(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict[str, Any]:
    """The efficiency.json document from the runs measured so far (variant -> list of worker results)."""

    def med_time(v):
        return statistics.median(t for r in runs[v] for t in r["step_times_s"])

    def med_mem(v):
        return statistics.median(r["peak_mem_mb"] for r in runs[v])

    first = next(iter(runs.values()))[0]
    variants = {
        v: {
            "step_time_s": med_time(v),
            "peak_mem_mb": med_mem(v),
            "reps": len(runs[v]),
            "step_times_s": [t for r in runs[v] for t in r["step_times_s"]],
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
    if all(v in runs for v in GRAM_VARIANTS):
        dense, gram = med_time("logits-sam:dense"), med_time("logits-sam:gram")
        doc["gram_vs_dense"] = {
            "tokens": first["tokens"],
            "hidden": first["hidden"],
            "vocab": first["vocab"],
            "auto_route": first["auto_route"],
            "dense_step_time_s": dense,
            "gram_step_time_s": gram,
            "time_ratio_gram/dense": gram / dense,
            "dense_peak_mem_mb": med_mem("logits-sam:dense"),
            "gram_peak_mem_mb": med_mem("logits-sam:gram"),
        }
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="figures", help="output directory for efficiency.json and figure2.png")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'pythia-shaped' (default), a preset of dynamics.lm.models, a config JSON with model_type, "
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
        "--reps", type=int, default=3, help="interleaved repetitions (one subprocess per variant each)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per subprocess (allocate optimizer state)"
    )
    p.add_argument("--rho", type=float, default=1e-3, help="SAM radius for logits-sam and sam")
    p.add_argument("--loss", default="sigmoid", help="preference loss (dynamics.lm.losses.LOSSES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per subprocess (1: robust on a shared machine)",
    )
    p.add_argument("--no-gram", action="store_true", help="skip the Gram-vs-dense logits-SAM comparison")
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

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available here")
    if args.model != DEFAULT_MODEL and not Path(args.model).exists():
        from dynamics.lm.models import PRESETS

        if args.model not in PRESETS:
            p.error(
                f"--model {args.model!r}: not 'pythia-shaped', a preset ({', '.join(PRESETS)}), a config JSON "
                "or a checkpoint directory"
            )
    if Path(args.model).is_file():
        try:
            cfg = json.loads(Path(args.model).read_text())
            cfg["model_type"]
        except (ValueError, KeyError, TypeError):
            p.error(f"--model {args.model}: expected a JSON config with a 'model_type' field")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    validate(parser, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = list(MAIN_VARIANTS) + ([] if args.no_gram else list(GRAM_VARIANTS))
    runs: dict[str, list[dict]] = {}
    doc: dict[str, Any] = {}
    for rep in range(args.reps):
        k = rep % len(variants)
        for variant in variants[k:] + variants[:k]:  # rotate the order each repetition
            try:
                result = run_variant(args, variant)
            except RuntimeError as err:
                parser.exit(1, f"efficiency.py: {err}\n")
            runs.setdefault(variant, []).append(result)
            print(
                f"rep {rep + 1}/{args.reps} {variant:18s} step {statistics.median(result['step_times_s']):.4f} s  "
                f"peak {result['peak_mem_mb']:.1f} MB",
                flush=True,
            )
        doc = summarize(args, runs)
        (out / "efficiency.json").write_text(json.dumps(doc, indent=2) + "\n")
    sys.path.insert(0, str(ROOT))
    from figures.figure2 import plot_efficiency

    plot_efficiency(doc, out / "figure2.png")
    for name, r in doc["ratios"].items():
        print(f"{name}: time {r['time']:.3f}, memory {r['memory']:.3f}")
    if "targets" in doc:
        print(json.dumps(doc["targets"]))
    if "gram_vs_dense" in doc:
        g = doc["gram_vs_dense"]
        print(
            f"gram/dense logits-SAM step time: {g['time_ratio_gram/dense']:.3f} (auto route: {g['auto_route']})"
        )
    print(f"wrote {out / 'efficiency.json'} and {out / 'figure2.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
