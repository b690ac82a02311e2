"""Figure 1 of the paper: (a) modal coefficients and (b) class residuals of the logit-space toy; (c)–(d) LM runs.

    python figures/figure1.py --panels a b --out DIR

writes DIR/figure1a.png, DIR/figure1b.png and DIR/figure1_toy.json (the data drawn). Default DIR is the folder
of this script (``figures/``). No math here: the runs come from ``dynamics.toy``. Deterministic: two runs give
byte-identical files.

    python figures/figure1.py --panels c d [--runs RUN_DIR ...] [--lm-split heldout|train_probe|train]

draws DIR/figure1c.png and DIR/figure1d.png: chosen, rejected and max_conf log-probs over steps, one line per run
(optimizer and ρ), from runs saved by experiments/squeezing.py. A panel uses the given runs on its paper's data
set (c: WebGPT, d: TL;DR); without them it draws the given runs, or the committed offline default runs in
figures/runs/, and its title says which model and data the curves come from.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dynamics._cli import OneLineErrorParser, output_dir, write_json  # noqa: E402
from dynamics.simulate import Trajectory  # noqa: E402
from dynamics.toy import ToyConfig, class_roles, run_toy, toy_record  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent
# One colour per optimizer, the same in every panel (Okabe-Ito, colour-blind safe).
COLORS = {"GD": "#000000", "SAM rho>0": "#D55E00", "SAM rho<0": "#0072B2"}
STYLES = {"GD": "-", "SAM rho>0": "--", "SAM rho<0": "-."}
# Fixed metadata so the PNG bytes do not depend on the date or the matplotlib version.
PNG_METADATA = {"Software": None}


def legend_label(traj: Trajectory) -> str:
    """Legend text of one run, e.g. 'SAM, ρ = +1 (same sign as η)'."""
    if traj.rho == 0:
        return "GD (ρ = 0)"
    relation = "same sign as η" if traj.rho * traj.eta > 0 else "opposite sign to η"
    return f"SAM, ρ = {traj.rho:+g} ({relation})"


def caption(config: ToyConfig) -> str:
    """Caption text of panels (a)–(b), with the defaults used."""
    p0 = ", ".join(f"{p:g}" for p in config.p0)
    return (
        f"Figure 1(a–b). Logit-space toy: one example with fixed features φ ∈ R^{config.d} "
        f"(μ = ‖φ‖² = {config.mu:g}), K = {len(config.p0)} classes, initial probabilities p₀ = ({p0}) with the "
        f"trained label y = class {config.label}; {config.steps} steps with a negative learning rate η = "
        f"{config.eta:g} (the rejected-response part of a DPO step) under GD, SAM with ρ = +{abs(config.rho):g} "
        f"and SAM with ρ = −{abs(config.rho):g} (exact updates, theory S2). (a) Modal coefficients e_k = v_kᵀg of "
        "the residual g = p − e_y in the eigenbasis of H_z = diag(p) − ppᵀ at each step (mode 0: null mode "
        "𝟙/√K, always 0; mode 2: highest curvature). (b) Class residuals g_k = p_k − [k = y] for y, the most "
        "likely other class y*, and the remaining class. Under GD, p_{y*} rises toward 1 (squeezing); SAM with ρ "
        "of the same sign as η slows it, the opposite sign speeds it up."
    )


@dataclass
class FigureContext:
    """What the panel functions share: parsed arguments, output folder, lazily computed toy runs."""

    args: argparse.Namespace
    out: Path
    config: ToyConfig
    _toy_runs: list[Trajectory] | None = field(default=None, repr=False)

    @property
    def toy_runs(self) -> list[Trajectory]:
        if self._toy_runs is None:
            self._toy_runs = run_toy(self.config)
            write_json(self.out / "figure1_toy.json", toy_record(self.config, self._toy_runs), indent=None)
        return self._toy_runs


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def _three_axes(title: str) -> tuple[plt.Figure, Sequence[plt.Axes]]:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), sharex=True, constrained_layout=True)
    fig.suptitle(title)
    return fig, axes


def draw_panel_a(ctx: FigureContext) -> list[Path]:
    """Panel (a): modal coefficients e_k = v_kᵀ g over steps, one subplot per mode (eigenvalues ascending)."""
    runs = ctx.toy_runs
    fig, axes = _three_axes(
        rf"(a) Modal coefficients $e_k = v_k^\top g$ of the residual in the eigenbasis of $H_z$, $\eta = {ctx.config.eta:g}$"
    )
    names = [
        r"mode 0: null mode $\mathbb{1}/\sqrt{K}$ ($\lambda_0 = 0$)",
        r"mode 1: lower curvature $\lambda_1$",
        r"mode 2: top curvature $\lambda_2$",
    ]
    for k, ax in enumerate(axes):
        for traj in runs:
            steps = range(traj.steps + 1)
            ax.plot(
                steps, traj.modal[:, k], STYLES[traj.name], color=COLORS[traj.name], label=legend_label(traj)
            )
        ax.set_title(names[k] if k < len(names) else f"mode {k}")
        ax.set_xlabel("step t")
        ax.set_ylabel(rf"$e_{k} = v_{k}^\top g$")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-1, 1)
    axes[-1].legend(loc="lower right", fontsize=8)
    return [_save(fig, ctx.out / "figure1a.png")]


def draw_panel_b(ctx: FigureContext) -> list[Path]:
    """Panel (b): class residuals g_k = p_k − [k = y] over steps for y, y* and the other class."""
    runs = ctx.toy_runs
    roles = class_roles(ctx.config)
    order = sorted(roles, key=lambda k: ["y", "y*", "other"].index(roles[k]))
    titles = {
        "y": r"class $y$ (trained label): $g_y = p_y - 1$",
        "y*": r"class $y^*$ (most likely other): $g_{y^*} = p_{y^*}$",
        "other": r"other class: $g_k = p_k$",
    }
    fig, axes = _three_axes(rf"(b) Class residuals $g = p - e_y$, $\eta = {ctx.config.eta:g}$")
    for ax, k in zip(axes, order, strict=True):
        for traj in runs:
            steps = range(traj.steps + 1)
            ax.plot(
                steps,
                traj.residuals[:, k],
                STYLES[traj.name],
                color=COLORS[traj.name],
                label=legend_label(traj),
            )
        ax.set_title(f"{titles[roles[k]]} (class {k})")
        ax.set_xlabel("step t")
        ax.set_ylabel({"y": r"$g_y$", "y*": r"$g_{y^*}$", "other": r"$g_{\mathrm{other}}$"}[roles[k]])
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    return [_save(fig, ctx.out / "figure1b.png")]


# ---------------------------------------------------------------------------------- panels (c)–(d): LM runs
DEFAULT_RUNS = DEFAULT_OUT / "runs"
LM_PANELS = {  # panel -> (data set of the paper's run, what the paper ran)
    "c": ("webgpt", "GPT-2 on WebGPT Comparisons"),
    "d": ("tldr", "Pythia-2.8B on TL;DR"),
}
LM_METRICS = (
    ("logp_chosen", r"chosen: $\log \pi(y^+\mid x)$"),
    ("logp_rejected", r"rejected: $\log \pi(y^-\mid x)$"),
    ("logp_max_conf", r"max_conf: $\sum_t \max_v \log \pi(v \mid x, y^+_{<t})$"),
)
LM_COLORS = {"adamw": "#000000", "logits-sam": "#D55E00", "sam": "#0072B2"}
LM_STYLES = {"adamw": "-", "logits-sam": "--", "sam": "-."}


LM_ROW_KEYS = ("step", "split") + tuple(key for key, _ in LM_METRICS)
LM_CONFIG_KEYS = ("optimizer", "rho", "model", "dataset")


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"--runs: {path} is not valid {what} ({str(err).splitlines()[0]})") from None


def read_lm_run(run_dir: Path) -> dict:
    """A saved squeezing run: {"dir", "config" (config.json), "rows" (metrics.jsonl)}; ValueError (one line
    naming the file) if a file is absent or malformed, or lacks a field the panels draw."""
    run_dir = Path(run_dir)
    metrics_path, config_path = run_dir / "metrics.jsonl", run_dir / "config.json"
    if not metrics_path.is_file() or not config_path.is_file():
        raise ValueError(f"--runs: {run_dir} is not a squeezing run (needs metrics.jsonl and config.json)")
    config = _read_json(config_path, "JSON")
    if not isinstance(config, dict) or any(key not in config for key in LM_CONFIG_KEYS):
        raise ValueError(
            f"--runs: {config_path}: expected a JSON object with the fields {list(LM_CONFIG_KEYS)}"
        )
    rows = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"--runs: {metrics_path} line {number} is not JSON ({err})") from None
        if not isinstance(row, dict) or any(key not in row for key in LM_ROW_KEYS):
            raise ValueError(f"--runs: {metrics_path} line {number}: expected the fields {list(LM_ROW_KEYS)}")
        rows.append(row)
    return {"dir": run_dir, "config": config, "rows": rows}


def lm_runs_for_panel(ctx: FigureContext, panel: str) -> tuple[list[dict], bool]:
    """(runs to draw in `panel`, whether they are the paper's model/data). Runs given with --runs whose data
    set matches the panel are used; otherwise all given runs (or the committed offline default runs under
    figures/runs/) stand in, and the title says so."""
    dirs = ctx.args.runs or sorted(p.parent for p in DEFAULT_RUNS.glob("*/metrics.jsonl"))
    if not dirs:
        raise ValueError(f"no runs given and none under {DEFAULT_RUNS}: run experiments/squeezing.py first")
    runs = [read_lm_run(d) for d in dirs]
    matching = [r for r in runs if r["config"].get("dataset") == LM_PANELS[panel][0]]
    return (matching, True) if matching else (runs, False)


def lm_label(run: dict) -> str:
    """Legend text of one run: optimizer and ρ."""
    cfg = run["config"]
    if cfg["optimizer"] == "adamw":
        return "AdamW (GD)"
    name = {"logits-sam": "logits-SAM", "sam": "full SAM"}[cfg["optimizer"]]
    return f"{name}, ρ = {cfg['rho']:g}"


def lm_source(runs: Sequence[dict]) -> str:
    """Which model and data the curves come from, from the runs' config.json."""
    sources = []
    for run in runs:
        cfg = run["config"]
        model = cfg["model"]
        if model in ("tiny-gpt2", "tiny-pythia"):
            model += " (tiny random-init model, SFT'd here)"
        sources.append(f"{model} on {cfg['dataset']} data")
    return "; ".join(dict.fromkeys(sources))


def draw_lm_panel(ctx: FigureContext, panel: str) -> list[Path]:
    """Panel (c) or (d): chosen, rejected and max_conf log-probs (means over the probe set) over steps."""
    runs, paper = lm_runs_for_panel(ctx, panel)
    split = ctx.args.lm_split
    title = f"({panel}) {lm_source(runs)}, probe set '{split}'"
    if not paper:
        title += f"\n(stand-in: no run of the paper's {LM_PANELS[panel][1]} on disk; not the paper's model or data)"
    fig, axes = _three_axes(title)
    for ax, (key, name) in zip(axes, LM_METRICS, strict=True):
        for run in runs:
            rows = [r for r in run["rows"] if r["split"] == split]
            opt = run["config"]["optimizer"]
            ax.plot(
                [r["step"] for r in rows],
                [r[key] for r in rows],
                LM_STYLES.get(opt, ":"),
                color=LM_COLORS.get(opt),
                label=lm_label(run),
            )
        ax.set_title(name)
        ax.set_xlabel("preference-training step")
        ax.set_ylabel("nats (summed over the response)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return [_save(fig, ctx.out / f"figure1{panel}.png")]


def draw_panel_c(ctx: FigureContext) -> list[Path]:
    """Panel (c): GPT-2 on WebGPT (paper); from --runs, or the committed offline default runs as a stand-in."""
    return draw_lm_panel(ctx, "c")


def draw_panel_d(ctx: FigureContext) -> list[Path]:
    """Panel (d): Pythia-2.8B on TL;DR (paper); from --runs, or the committed offline default runs as a stand-in."""
    return draw_lm_panel(ctx, "d")


PANELS: dict[str, Callable[[FigureContext], list[Path]]] = {
    "a": draw_panel_a,
    "b": draw_panel_b,
    "c": draw_panel_c,
    "d": draw_panel_d,
}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; panels c/d may add their own flags here."""
    defaults = ToyConfig()
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--panels", nargs="+", choices=sorted(PANELS), default=["a", "b"], help="panels to draw"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: figures/)")
    parser.add_argument(
        "--eta", type=float, default=defaults.eta, help="toy learning rate η (default %(default)s)"
    )
    parser.add_argument(
        "--rho", type=float, default=defaults.rho, help="toy SAM radius |ρ| (default %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="toy steps T (default %(default)s)")
    parser.add_argument("--caption", action="store_true", help="print the caption of panels a-b and exit")
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=None,
        help="panels c-d: saved squeezing run folders (default: figures/runs/*)",
    )
    parser.add_argument(
        "--lm-split",
        choices=("heldout", "train_probe", "train"),
        default="heldout",
        help="panels c-d: which rows to draw (default %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ToyConfig(eta=args.eta, rho=args.rho, steps=args.steps)
    except ValueError as exc:
        parser.error(str(exc))
    if args.caption:
        print(caption(config))
        return 0
    output_dir(parser, args.out)
    ctx = FigureContext(args=args, out=args.out, config=config)
    for panel in dict.fromkeys(args.panels):  # keep order, drop repeats; each panel is written as it is drawn
        try:
            paths = PANELS[panel](ctx)
        except ValueError as exc:
            parser.error(str(exc))
        except OSError as exc:  # the panels already written stay
            parser.exit(1, f"{parser.prog}: cannot write panel {panel}: {exc}\n")
        for path in paths:
            print(f"figure1: wrote {path}")
    if ctx._toy_runs is not None:
        print(f"figure1: wrote {args.out / 'figure1_toy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
