"""Figure 2: time per step and peak memory of AdamW, logits-SAM and full SAM, from efficiency.json.

A pure function of the saved benchmark: ``python figures/figure2.py [figures/efficiency.json] [--out PNG]``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamics._cli import OneLineErrorParser, output_file

MAIN_VARIANTS = ("adamw", "logits-sam", "sam")
LABELS = {"adamw": "AdamW", "logits-sam": "logits-SAM", "sam": "SAM"}
COLORS = {"adamw": "#4c72b0", "logits-sam": "#dd8452", "sam": "#55a868"}


def plot_efficiency(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write the two-panel bar chart (time per step, peak memory) with ratios to AdamW, plus the Gram-vs-dense
    comparison when present, to ``path`` (PNG). ``data`` is the efficiency.json schema."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in MAIN_VARIANTS if v in data["variants"]]
    gram = data.get("gram_vs_dense")
    ncols = 3 if gram else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6))
    base = data["variants"].get("adamw", {})
    panels = [("step_time_s", "time per step (s)"), ("peak_mem_mb", "peak memory (MB)")]
    for ax, (key, label) in zip(axes, panels, strict=False):
        vals = [data["variants"][v][key] for v in variants]
        bars = ax.bar([LABELS[v] for v in variants], vals, color=[COLORS[v] for v in variants])
        for bar, val in zip(bars, vals, strict=True):
            ratio = val / base[key] if base.get(key) else float("nan")
            ax.annotate(
                f"{val:.3g}\n×{ratio:.3f}",
                (bar.get_x() + bar.get_width() / 2, val),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylabel(label)
        ax.set_ylim(0, max(vals) * 1.3)
    if gram:
        ax = axes[2]
        cases = gram["cases"]
        labels = [f"N={c['tokens']}\nd={c['hidden']}" for c in cases]
        x = range(len(cases))
        ax.bar([i - 0.2 for i in x], [1e3 * c["dense_s"] for c in cases], 0.4, label="dense", color="#8172b3")
        ax.bar([i + 0.2 for i in x], [1e3 * c["gram_s"] for c in cases], 0.4, label="Gram", color="#937860")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("logits-SAM head work (ms)")
        ax.set_title("Gram vs dense route", fontsize=9)
        ax.legend(fontsize=8)
    cfg = data.get("config", {})
    fig.suptitle(
        f"{cfg.get('model', 'model')}: head share {100 * data['head_share']:.2f}%, "
        f"{cfg.get('batch_pairs', '?')} pairs × {cfg.get('seq_len', '?')} tokens, {cfg.get('device', 'cpu')}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_efficiency_doc(data: Any) -> None:
    """ValueError (one line) unless ``data`` has the efficiency.json fields this figure draws: a numeric
    ``head_share`` and ``variants`` mapping each variant to numeric ``step_time_s`` and ``peak_mem_mb``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("head_share"), (int, float)):
        raise ValueError("expected a numeric 'head_share' field")
    variants = data.get("variants")
    if not isinstance(variants, Mapping) or not any(v in variants for v in MAIN_VARIANTS):
        raise ValueError(f"expected a 'variants' object with at least one of {list(MAIN_VARIANTS)}")
    for v in MAIN_VARIANTS:
        for key in ("step_time_s", "peak_mem_mb"):
            if v in variants and not isinstance(_get(variants[v], key), (int, float)):
                raise ValueError(f"expected a number at variants.{v}.{key}")


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__)
    parser.add_argument("json", nargs="?", default="figures/efficiency.json", help="efficiency.json to plot")
    parser.add_argument("--out", default=None, help="output PNG (default: figure2.png beside the JSON)")
    args = parser.parse_args(argv)
    src = Path(args.json)
    if not src.is_file():
        parser.error(f"{src}: no such file (run experiments/efficiency.py first)")
    try:
        data = json.loads(src.read_text())
        check_efficiency_doc(data)
    except (ValueError, UnicodeDecodeError) as err:
        parser.error(f"{src}: not an efficiency.json ({str(err).splitlines()[0]})")
    out = output_file(parser, args.out or src.with_name("figure2.png"))
    try:
        plot_efficiency(data, out)
    except OSError as err:
        parser.exit(1, f"{parser.prog}: cannot write {out}: {err}\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
