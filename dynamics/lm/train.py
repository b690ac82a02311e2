"""SFT then preference training (DPO and friends) with plain AdamW, logits-SAM or full SAM [ours].

Built on `accelerate` (device choice, process group under `accelerate launch`) and `dynamics.lm.perturb`'s
`PreferenceStep`, which does forward, backward, the gradient all-reduce (pass the unwrapped model) and the
optimizer step; logits-SAM's ‖G_W‖ is local or global across replicas (`sam_norm`).

Outputs in `out/`:

- `config.json`: the resolved `TrainConfig` (+ preset, world size);
- `metrics.jsonl`: one JSON line per optimizer step (`split` = "train", batch means on the clean logits) and,
  at step 0 and every `eval_every` steps, one line per probe set (`split` = "heldout" / "train_probe"), each
  with step, split, optimizer, rho, logp_chosen, logp_rejected, logp_max_conf, loss, margin, accuracy;
- `sft/` (the SFT model, when `sft_steps` > 0) and `sft_metrics.jsonl`;
- `checkpoint/` every `checkpoint_every` steps: model, optimizer, RNG states, step (= data position: the
  data order is a pure function of the seed and the step) and the byte length of metrics.jsonl at that step.

`resume=True` restores the checkpoint and truncates metrics.jsonl to the checkpoint's length, so after a
`kill -9` the final file holds every step exactly once and, on CPU, equals an uninterrupted run's. A
non-finite loss stops the run with `NonFiniteLossError` before the parameters are touched, leaving the last
good checkpoint in place.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynamics.lm import curvature
from dynamics.lm.data import collate_pairs, collate_sft, load_preference_data
from dynamics.lm.logps import sequence_logps, token_logps
from dynamics.lm.losses import AVERAGES_LOGPS, LOSSES, PreferenceObjective
from dynamics.lm.models import PRESETS, load_model
from dynamics.lm.perturb import METHODS, NORMS, PreferenceStep
from dynamics.lm.probes import batch_to, pair_logps, run_probes


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before the parameters were updated."""


@dataclass
class TrainConfig:
    """Every knob of a run; `None` fields are filled from the model's preset by `resolve_config`.

    model: preset name, hub id or local directory.  dataset: a `dynamics.lm.data` name.  data_file: local
    raw-schema file (instead of the hub).  eval_data_file: local file for the held-out probe pairs.
    split / eval_split / sft_split: data splits (sft_split None: "sft" for synthetic, else `split`).
    n_train: training pairs kept (None: all).  n_probe: held-out probe pairs, and training pairs in the fixed
    "train_probe" subset.  init_from: a model directory to start from (skips SFT; e.g. a saved SFT model).
    sft_steps / sft_lr / sft_batch_size: the SFT stage on chosen responses.  optimizer: "adamw",
    "logits-sam" or "sam".  rho: SAM radius.  sam_norm: "global" (all-reduced ‖G_W‖; default) or "local".
    loss / beta: the preference loss (`dynamics.lm.losses.LOSSES`).  lr, weight_decay: AdamW.  batch_size:
    pairs per optimizer step over all processes and accumulation steps.  grad_accum: micro-batches per step.
    steps: optimizer steps.  eval_every: probe period.  checkpoint_every: checkpoint period, plus one at
    the last step (0: no checkpoints).  seed.  out: output directory.  resume: continue from out/checkpoint.  bf16: autocast to bfloat16.
    gradient_checkpointing.  device: "auto", "cpu" or "cuda".  max_length / max_prompt_length: tokens.
    curvature_probe: log `dynamics.lm.curvature` means in the probe rows.  progress: show the tqdm bar.
    """

    model: str = "tiny-gpt2"
    dataset: str | None = None
    data_file: str | None = None
    eval_data_file: str | None = None
    split: str = "train"
    eval_split: str = "test"
    sft_split: str | None = None
    n_train: int | None = None
    n_probe: int = 32
    init_from: str | None = None
    sft_steps: int | None = None
    sft_lr: float | None = None
    sft_batch_size: int | None = None
    optimizer: str = "adamw"
    rho: float | None = None
    sam_norm: str = "global"
    loss: str = "sigmoid"
    beta: float | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int | None = None
    grad_accum: int = 1
    steps: int | None = None
    eval_every: int = 10
    checkpoint_every: int = 0
    seed: int = 0
    out: str = "runs/squeezing"
    resume: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    device: str = "auto"
    max_length: int | None = None
    max_prompt_length: int | None = None
    curvature_probe: bool = False
    progress: bool = True


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill `None` fields from the preset (tiny-gpt2's when the model is not a preset) and validate.

    ValueError with a one-line message for any bad value (unknown optimizer / loss, non-positive sizes,
    non-finite ρ, a batch not divisible into micro-batches).
    """
    preset = PRESETS.get(cfg.model, PRESETS["tiny-gpt2"])
    fill = {
        "dataset": preset.dataset,
        "sft_steps": preset.sft_steps,
        "sft_lr": preset.sft_lr,
        "sft_batch_size": preset.batch_size,
        "rho": preset.rho,
        "beta": preset.beta,
        "lr": preset.lr,
        "batch_size": preset.batch_size,
        "steps": preset.steps,
        "max_length": preset.max_length,
        "max_prompt_length": preset.max_prompt_length,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fill.items() if getattr(cfg, k) is None})
    if cfg.sft_split is None:
        cfg = dataclasses.replace(cfg, sft_split="sft" if cfg.dataset == "synthetic" else cfg.split)
    if cfg.optimizer not in METHODS:
        raise ValueError(f"optimizer must be one of {list(METHODS)}, got {cfg.optimizer!r}")
    if cfg.sam_norm not in NORMS:
        raise ValueError(f"sam_norm must be one of {list(NORMS)}, got {cfg.sam_norm!r}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {cfg.loss!r}")
    for name in ("batch_size", "grad_accum", "steps", "eval_every", "n_probe", "sft_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("sft_steps", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "beta", "sft_lr"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {getattr(cfg, name)}")
    if not math.isfinite(cfg.rho):
        raise ValueError(f"rho must be finite, got {cfg.rho}")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.n_train is not None and cfg.n_train < 1:
        raise ValueError(f"n_train must be >= 1 or None (all), got {cfg.n_train}")
    for name in ("data_file", "eval_data_file"):
        path = getattr(cfg, name)
        if path is not None and cfg.dataset == "synthetic":
            raise ValueError(
                f"{name} is a raw-schema file of a named data set: give its dataset (webgpt, tldr or hh); "
                "the synthetic task reads no file"
            )
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path} does not exist (expected a local raw-schema data file)")
    if cfg.init_from is not None and not Path(cfg.init_from).is_dir():
        raise ValueError(f"init_from {cfg.init_from} is not a folder (expected a saved model directory)")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"out: expected a folder, got the file {cfg.out}")
    return cfg


# ------------------------------------------------------------------------------------------- small helpers
def make_out_dir(out: Path) -> None:
    """Create the run folder; ValueError (one line) when it cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out: cannot create the folder {out}: {err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"out: expected a writable folder, got {out}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code may use the global RNG)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch CPU and CUDA."""
    numpy_state = np.random.get_state()  # noqa: NPY002
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of the pairs used at optimizer step `step` (1-based): consecutive slices of a per-epoch
    permutation (torch.randperm seeded by seed and epoch), wrapping across epochs. A pure function of
    (step, batch_size, n, seed): the data position after a resume is just the step."""
    start = (step - 1) * batch_size
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            ).tolist()
        out.append(perms[epoch][i])
    return out


def _append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a killed run keeps every line written before)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


class GuardedObjective:
    """Wraps a loss function; raises NonFiniteLossError on a non-finite loss *before* any backward pass,
    so the parameters and the optimizer are untouched when the run stops."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if not bool(torch.isfinite(logits.detach()).all()):
            raise NonFiniteLossError("the logits became non-finite")
        try:
            loss, metrics = self.inner(logits, batch)
        except ValueError as err:
            if "finite" in str(err):
                raise NonFiniteLossError(str(err)) from None
            raise
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(f"the loss is {float(loss)}")
        return loss, metrics


# -------------------------------------------------------------------------------------------------- SFT
def sft_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean negative log-likelihood of the response tokens (B, T batch from `collate_sft`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["response_mask"][:, 1:].to(torch.float32)
    return -(token_logps(logits, batch["input_ids"]) * mask).sum() / mask.sum().clamp_min(1.0)


def run_sft(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, str]],
    cfg: TrainConfig,
    device: torch.device,
    log_path: Path | None = None,
) -> list[dict]:
    """`cfg.sft_steps` AdamW steps (lr `cfg.sft_lr`) of SFT on the chosen responses; returns the log rows."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    model.train()
    rows = []
    bar = tqdm(range(1, cfg.sft_steps + 1), desc="sft", disable=not cfg.progress, leave=False)
    for step in bar:
        idx = batch_indices(step, cfg.sft_batch_size, len(records), cfg.seed + 1)
        batch = collate_sft([records[i] for i in idx], tokenizer, cfg.max_length, cfg.max_prompt_length)
        loss = sft_loss(model, batch_to(batch, device))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"SFT loss is {float(loss)} at SFT step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.sft_steps:
            row = {"sft_step": step, "loss": float(loss.detach())}
            rows.append(row)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if log_path is not None:
                _append_jsonl(log_path, row)
    return rows


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, metrics_bytes: int
) -> None:
    """Atomically write model, optimizer, RNG states, step and metrics.jsonl length to `path` (a directory)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "step": step,
        "metrics_bytes": metrics_bytes,
    }
    torch.save(state, tmp / "state.pt")
    with (tmp / "state.pt").open("rb") as f:
        os.fsync(f.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved by `save_checkpoint` (falls back to the previous one if a kill hit the swap)."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / "state.pt").is_file():
            return torch.load(candidate / "state.pt", map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"no checkpoint in {path}")


# ----------------------------------------------------------------------------------------------- the run
def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return Accelerator(cpu=cpu)


def _probe_batches(
    records: Sequence[Mapping[str, str]], tokenizer: Any, cfg: TrainConfig, size: int = 16
) -> list:
    return [
        collate_pairs(records[i : i + size], tokenizer, cfg.max_length, cfg.max_prompt_length)
        for i in range(0, len(records), size)
    ]


def _curvature_extra(cfg: TrainConfig):
    """The `--curvature-probe` hook: per-token curvature means (`dynamics.lm.curvature`: tr H_z, μ = ‖h‖²,
    the head's Hessian trace μ·tr H_z (S1), the top-mode share of the residual (S4)) over the chosen
    responses of a probe set, and from the second probe on the confidence ratios α = p_now / p_previous-probe
    of the chosen token, the argmax token and y* (S5), as `curv_*` fields of the probe rows."""
    if not cfg.curvature_probe:
        return None

    # Per (probe set, batch): a compact snapshot of the previous probe's chosen-token log-probs, so that each
    # probe row also carries the confidence ratios α since the previous probe (absent at the first probe of a
    # process: step 0, or the first probe after --resume).
    snapshots: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def extra(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], split: str) -> dict:
        """Token-weighted means over the probe set of `summarize_curvature`, on the chosen rows."""
        device = next(model.parameters()).device
        totals: dict[str, float] = {}
        counts: dict[str, float] = {}
        for index, batch in enumerate(batches):
            b = batch_to(batch, device)
            half = b["input_ids"].shape[0] // 2
            ids, attention, response = (
                b["input_ids"][:half],
                b["attention_mask"][:half],
                b["response_mask"][:half],
            )
            stats, logits = curvature.model_token_curvature(model, ids, attention, response)
            summaries = [curvature.summarize_curvature(stats)]
            mask = response[:, 1:] * attention[:, 1:]
            before = snapshots.get((split, index))
            if before is not None:
                summaries.append(
                    curvature.summarize_curvature(curvature.confidence_ratios_since(before, logits))
                )
            snapshots[(split, index)] = curvature.confidence_snapshot(logits, ids[:, 1:], mask)
            for summary in summaries:
                n = summary.pop("n_tokens")
                for key, value in summary.items():
                    totals[key] = totals.get(key, 0.0) + value * n
                    counts[key] = counts.get(key, 0.0) + n
        return {f"curv_{k}": v / max(counts[k], 1.0) for k, v in totals.items()}

    return extra


def load_records(cfg: TrainConfig) -> dict[str, list[dict[str, str]]]:
    """{"train", "heldout", "sft"} records of the run's data set (n_train / n_probe applied)."""
    train = load_preference_data(cfg.dataset, cfg.split, cfg.data_file, limit=cfg.n_train, seed=cfg.seed)
    if cfg.eval_data_file is not None or cfg.dataset == "synthetic":
        heldout = load_preference_data(
            cfg.dataset, cfg.eval_split, cfg.eval_data_file, limit=cfg.n_probe, seed=cfg.seed
        )
    else:
        # no separate held-out file: hold out the last n_probe training pairs
        if len(train) <= cfg.n_probe:
            raise ValueError(f"need more than n_probe={cfg.n_probe} pairs to hold some out, got {len(train)}")
        train, heldout = train[: -cfg.n_probe], train[-cfg.n_probe :]
    if cfg.sft_steps and cfg.init_from is None:
        if cfg.dataset == "synthetic" or cfg.sft_split != cfg.split:
            sft = load_preference_data(
                cfg.dataset, cfg.sft_split, cfg.data_file, limit=cfg.n_train, seed=cfg.seed
            )
        else:
            sft = train
    else:
        sft = []
    return {"train": train, "heldout": heldout, "sft": sft}


def train(cfg: TrainConfig) -> Path:
    """Run SFT (optional) then preference training as configured; returns the output directory.

    Raises ValueError for a bad configuration, `ModelUnavailableError` / `DataUnavailableError` when weights
    or data cannot be reached, NonFiniteLossError when the loss diverges (the last checkpoint is kept).
    """
    cfg = resolve_config(cfg)
    accelerator = _accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    world = accelerator.num_processes
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by grad_accum × processes = {cfg.grad_accum * world}"
        )
    out = Path(cfg.out)
    metrics_path, ckpt_path = out / "metrics.jsonl", out / "checkpoint"
    if main:
        make_out_dir(out)
        if not cfg.resume and metrics_path.exists():
            raise ValueError(
                f"{metrics_path} exists: pass --resume to continue that run, or choose another --out"
            )
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.init_from or cfg.model, seed=cfg.seed)  # fails fast without weights
    model.to(device)
    records = load_records(cfg)
    if cfg.init_from is None and cfg.sft_steps:
        model = _sft_into(model, tokenizer, records["sft"], cfg, out, device, main)
    accelerator.wait_for_everyone()
    if cfg.gradient_checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()  # transformers >= 5 renamed gradient_checkpointing_enable
        model.config.use_cache = False
    reference = copy.deepcopy(model).eval().requires_grad_(False)

    train_records = records["train"]
    probe_sets = {
        "heldout": _probe_batches(records["heldout"], tokenizer, cfg),
        "train_probe": _probe_batches(train_records[: cfg.n_probe], tokenizer, cfg),
    }
    ref_probe = {k: pair_logps(reference, v) for k, v in probe_sets.items()}
    rho = cfg.rho if cfg.optimizer != "adamw" else 0.0  # plain AdamW runs (and are logged) with ρ = 0
    objective = GuardedObjective(PreferenceObjective(cfg.loss, cfg.beta))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stepper = PreferenceStep(
        model,
        optimizer,
        objective,
        cfg.optimizer,
        rho,
        norm=cfg.sam_norm,
        autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
    )
    extra = _curvature_extra(cfg)
    tag = {"optimizer": cfg.optimizer, "rho": rho}

    start = 0
    if cfg.resume and (load_ckpt := _maybe_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(load_ckpt["model"])
        optimizer.load_state_dict(load_ckpt["optimizer"])
        set_rng_state(load_ckpt["rng"])
        start = int(load_ckpt["step"])
        if main:
            with metrics_path.open("r+b") as f:
                f.truncate(int(load_ckpt["metrics_bytes"]))
    elif main and metrics_path.exists():
        metrics_path.unlink()  # --resume without a checkpoint: start over, never duplicate rows
    if main:
        resolved = {**dataclasses.asdict(cfg), "world_size": world}
        if cfg.model in PRESETS:
            resolved["preset"] = PRESETS[cfg.model].as_dict()
        (out / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")

    def probe(step: int) -> dict[str, dict]:
        rows = run_probes(model, probe_sets, ref_probe, cfg.loss, cfg.beta, extra)
        if main:
            for split, row in rows.items():
                _append_jsonl(metrics_path, {"step": step, "split": split, **tag, **row})
        return rows

    if start == 0:
        probe(0)
        if cfg.checkpoint_every and main:
            save_checkpoint(ckpt_path, model, optimizer, 0, metrics_path.stat().st_size)
    micro_size = cfg.batch_size // (cfg.grad_accum * world)
    bar = tqdm(
        range(start + 1, cfg.steps + 1),
        desc=f"{cfg.optimizer} ρ={rho:g}",
        disable=not (cfg.progress and main),
    )
    for step in bar:
        idx = batch_indices(step, cfg.batch_size, len(train_records), cfg.seed)
        mine = idx[accelerator.process_index * cfg.batch_size // world :][: cfg.batch_size // world]
        micro = []
        for j in range(cfg.grad_accum):
            recs = [train_records[i] for i in mine[j * micro_size : (j + 1) * micro_size]]
            batch = batch_to(collate_pairs(recs, tokenizer, cfg.max_length, cfg.max_prompt_length), device)
            with torch.no_grad():
                ref_logits = reference(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                batch.update(_reference_logps(ref_logits, batch, cfg.loss))
            micro.append(batch)
        try:
            m = stepper(micro)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({err}); stopped, parameters not updated; last good checkpoint: "
                f"{ckpt_path if ckpt_path.exists() else 'none'}; metrics so far in {metrics_path}"
            ) from None
        if world > 1:  # batch means over all processes (equal shares), so the row describes the global batch
            keys = sorted(m)
            values = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(values)
            m = dict(zip(keys, (values / world).tolist(), strict=True))
        row = {
            "step": step,
            "split": "train",
            **tag,
            "logp_chosen": m["chosen_logps"],
            "logp_rejected": m["rejected_logps"],
            "logp_max_conf": m["max_conf"],
            "loss": m["loss_clean"],
            "loss_perturbed": m["loss_perturbed"],
            "margin": m["margin"],
            "accuracy": m["accuracy"],
        }
        if main:
            _append_jsonl(metrics_path, row)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rows = probe(step)
            h = rows["heldout"]
            bar.set_postfix(
                chosen=f"{h['logp_chosen']:.2f}",
                rejected=f"{h['logp_rejected']:.2f}",
                max_conf=f"{h['logp_max_conf']:.2f}",
            )
        else:
            bar.set_postfix(loss=f"{m['loss_clean']:.3f}", chosen=f"{m['chosen_logps']:.2f}")
        if main and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(ckpt_path, model, optimizer, step, metrics_path.stat().st_size)
    accelerator.wait_for_everyone()
    return out


def _sft_into(model, tokenizer, records, cfg: TrainConfig, out: Path, device, main: bool):
    """SFT `model` into out/sft (reused when out/sft/DONE exists); returns the SFT model on `device`."""
    sft_dir = out / "sft"
    if (sft_dir / "DONE").is_file():
        model, _ = load_model(str(sft_dir))
        return model.to(device)
    run_sft(model, tokenizer, records, cfg, device, out / "sft_metrics.jsonl" if main else None)
    if main:
        model.save_pretrained(sft_dir)
        tokenizer.save_pretrained(sft_dir)
        (sft_dir / "DONE").write_text("SFT finished\n")
    return model


def sft_stage(cfg: TrainConfig) -> Path:
    """Only the SFT stage: SFT `cfg.model` on the chosen responses into `cfg.out`/sft and return that
    directory (reused if already complete), so several preference runs can start from one SFT model."""
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    if (out / "sft" / "DONE").is_file():
        return out / "sft"
    accelerator = _accelerator(cfg)
    make_out_dir(out)
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    records = load_records(dataclasses.replace(cfg, init_from=None))
    model.to(accelerator.device)
    _sft_into(model, tokenizer, records["sft"], cfg, out, accelerator.device, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return out / "sft"


def _maybe_checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        return load_checkpoint(path)
    except FileNotFoundError:
        return None


def _reference_logps(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor], loss: str
) -> dict[str, torch.Tensor]:
    """ref_chosen_logps / ref_rejected_logps (B,) in the form the loss uses (summed or length-averaged)."""
    seq = sequence_logps(logits, batch["input_ids"], batch["response_mask"], average=AVERAGES_LOGPS[loss])
    half = seq.shape[0] // 2
    return {"ref_chosen_logps": seq[:half].detach(), "ref_rejected_logps": seq[half:].detach()}
