"""Figure 1(c–d) runs: SFT, then DPO with AdamW and logits-SAM from the same SFT model; probes to metrics.jsonl.

    python experiments/squeezing.py                       # offline default: tiny GPT-2, synthetic task, CPU
    python experiments/squeezing.py --model gpt2          # Figure 1(c): GPT-2 + WebGPT comparisons (GPU)
    python experiments/squeezing.py --model pythia-2.8b   # Figure 1(d): Pythia-2.8B TL;DR SFT + TL;DR (GPU)

Each optimizer writes OUT/<optimizer>[-rho<ρ>]/{config.json, metrics.jsonl, checkpoint/}; the shared SFT model
goes to OUT/sft/. Unset hyperparameters come from the model's preset (`dynamics.lm.models.PRESETS`).
Multi-GPU: `accelerate launch experiments/squeezing.py ...` (DDP; logits-SAM's ‖G_W‖ global by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dynamics._cli import OneLineErrorParser
from dynamics.lm.data import KNOWN_DATASETS, DataUnavailableError
from dynamics.lm.losses import LOSSES
from dynamics.lm.models import PRESETS, ModelUnavailableError
from dynamics.lm.perturb import METHODS, NORMS
from dynamics.lm.train import NonFiniteLossError, TrainConfig, resolve_config, sft_stage, train

DEFAULT_OUT = "runs/squeezing"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--model", default="tiny-gpt2", help=f"preset ({', '.join(PRESETS)}), hub id or local directory")
    a("--dataset", choices=KNOWN_DATASETS, default=None, help="data set (default: the preset's)")
    a("--data-file", default=None, help="local JSONL/JSON/parquet file in the data set's raw schema")
    a(
        "--eval-data-file",
        default=None,
        help="local file of held-out probe pairs (default: hold out n-probe pairs)",
    )
    a("--n-train", type=int, default=None, help="training pairs kept (default: all; synthetic: 256)")
    a(
        "--n-probe",
        type=int,
        default=32,
        help="pairs in each probe set (held-out, and a fixed training subset)",
    )
    a("--init-from", default=None, help="model directory to start preference training from (skips SFT)")
    a("--sft-steps", type=int, default=None, help="SFT steps on the chosen responses before DPO (0: none)")
    a("--sft-lr", type=float, default=None)
    a("--sft-batch-size", type=int, default=None)
    a(
        "--optimizer",
        nargs="+",
        choices=METHODS,
        default=["adamw", "logits-sam"],
        help="one run per optimizer",
    )
    a("--rho", type=float, default=None, help="SAM radius (logits-sam, sam); any sign; default: the preset's")
    a("--sam-norm", choices=NORMS, default="global", help="logits-SAM norm across DDP replicas")
    a("--loss", choices=sorted(LOSSES), default="sigmoid", help="preference loss (sigmoid = DPO)")
    a("--beta", type=float, default=None)
    a("--lr", type=float, default=None)
    a("--weight-decay", type=float, default=0.0)
    a("--batch-size", type=int, default=None, help="pairs per optimizer step, all processes together")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--steps", type=int, default=None, help="preference-training optimizer steps")
    a("--eval-every", type=int, default=None, help="probe period in steps (default: steps/20)")
    a("--checkpoint-every", type=int, default=None, help="checkpoint period in steps (default: eval-every)")
    a("--seed", type=int, default=0)
    a("--out", default=DEFAULT_OUT, help="output directory")
    a("--resume", action="store_true", help="continue the runs in --out from their last checkpoints")
    a("--bf16", action="store_true", help="bfloat16 autocast")
    a("--gradient-checkpointing", action="store_true")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--max-length", type=int, default=None)
    a("--max-prompt-length", type=int, default=None)
    a("--curvature-probe", action="store_true", help="log per-token curvature means in the probe rows")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def run_name(optimizer: str, rho: float) -> str:
    """Directory name of one run: "adamw", or "<optimizer>-rho<ρ>" for the SAM variants."""
    return optimizer if optimizer == "adamw" else f"{optimizer}-rho{rho:g}"


def configs_from_args(args: argparse.Namespace) -> list[TrainConfig]:
    """One resolved TrainConfig per optimizer (ValueError on a bad value)."""
    base = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_file=args.data_file,
        eval_data_file=args.eval_data_file,
        n_train=args.n_train,
        n_probe=args.n_probe,
        init_from=args.init_from,
        sft_steps=args.sft_steps,
        sft_lr=args.sft_lr,
        sft_batch_size=args.sft_batch_size,
        rho=args.rho,
        sam_norm=args.sam_norm,
        loss=args.loss,
        beta=args.beta,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        curvature_probe=args.curvature_probe,
        progress=not args.no_progress,
    )
    base = resolve_config(base)
    eval_every = args.eval_every if args.eval_every is not None else max(1, base.steps // 20)
    ckpt = args.checkpoint_every if args.checkpoint_every is not None else eval_every
    base = dataclasses.replace(base, eval_every=eval_every, checkpoint_every=ckpt)
    return [
        resolve_config(
            dataclasses.replace(base, optimizer=opt, out=str(Path(args.out) / run_name(opt, base.rho)))
        )
        for opt in dict.fromkeys(args.optimizer)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_progress:  # also the weight-loading bar that transformers draws
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        configs = configs_from_args(args)
        first = configs[0]
        if first.init_from is None and first.sft_steps:
            sft_dir = sft_stage(dataclasses.replace(first, out=args.out))
            configs = [dataclasses.replace(c, init_from=str(sft_dir), sft_steps=0) for c in configs]
        for cfg in configs:
            out = train(cfg)
            label = cfg.optimizer if cfg.optimizer == "adamw" else f"{cfg.optimizer} (rho={cfg.rho:g})"
            print(f"{label}: {out / 'metrics.jsonl'}", flush=True)
    except ValueError as err:  # a bad flag value or input file: usage error, exit 2
        parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except (ModelUnavailableError, DataUnavailableError) as err:  # nothing wrong with the flags: exit 1
        print(f"{parser.prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        print(f"squeezing.py: stopped: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
