"""Chart of % of roofline per kernel from a suite JSON (bench/run_all.py output).

For each (bench, case) row the roofline share is max(%copy, %matmul): the fraction of the time
floor, max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both ceilings measured in the same
run, that the measured time achieves. qkern is drawn next to the baselines of the same case
(horizontal bars, one group per case). Rows with neither bytes nor FLOPs are skipped.

    python3 bench/plot_roofline.py bench/results/suite-<card>-<date>.json [--out docs/roofline.png]

Uses matplotlib (present on the GPU machine); without it an SVG with the same bars is written
next to the requested path instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from xml.sax.saxutils import escape

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def roofline_share(row: dict) -> float | None:
    """max(%copy, %matmul) of a result row, or None when the row has neither."""
    vals = [row.get(k) for k in ("%copy", "%matmul") if row.get(k) is not None]
    vals = [v for v in vals if v == v]  # drop NaN
    return max(vals) if vals else None


def collect(payload: dict) -> tuple[OrderedDict, list[str]]:
    """{(bench, case): {provider: share}} in file order, and the providers (qkern first)."""
    groups: OrderedDict = OrderedDict()
    providers: list[str] = []
    for row in payload.get("rows", []):
        share = roofline_share(row)
        if share is None:
            continue
        key = (row["bench"], row["case"])
        groups.setdefault(key, {})[row["provider"]] = share
        if row["provider"] not in providers:
            providers.append(row["provider"])
    order = list(providers)
    return groups, sorted(providers, key=lambda p: (p != "qkern", order.index(p)))


def _title(payload: dict) -> str:
    env = payload.get("environment", {})
    c = payload.get("ceilings") or {}
    bits = [str(env.get("card", "")), str(env.get("date", ""))]
    if c:
        bits.append(
            f"copy {c.get('copy_gbs', 0):.0f} GB/s, bf16 {c.get('matmul_tflops', 0):.0f} TFLOP/s"
        )
    return "% of roofline per kernel — " + ", ".join(b for b in bits if b)


def plot_matplotlib(groups: OrderedDict, providers: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.32 * n * max(1, len(providers)) ** 0.6 + 1)))
    labels = [f"{b}: {c}" for b, c in groups]
    for j, prov in enumerate(providers):
        ys = [i + (j - (len(providers) - 1) / 2) * width for i in range(n)]
        xs = [g.get(prov, 0.0) for g in groups.values()]
        ax.barh(ys, xs, height=width, label=prov, color=PALETTE[j % len(PALETTE)])
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.set_xlabel("% of roofline (max of % copy bandwidth, % bf16 matmul)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)


def plot_svg(groups: OrderedDict, providers: list[str], title: str, out: Path) -> None:
    """The same horizontal bars as plain SVG (no dependencies)."""
    bar, gap, left, scale = 10, 8, 330, 4.0  # px per bar, px between groups, label column, px/%
    xmax = max([100.0] + [v for g in groups.values() for v in g.values()])
    width = int(left + scale * xmax + 40)
    y = 40
    parts = [f'<text x="10" y="20" font-size="12">{escape(title)}</text>']
    for (b, c), g in groups.items():
        parts.append(f'<text x="{left - 6}" y="{y + bar}" font-size="9" text-anchor="end">'
                     f"{escape(f'{b}: {c}')}</text>")  # fmt: skip
        for j, prov in enumerate(providers):
            if prov in g:
                w = scale * g[prov]
                parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 1}" '
                             f'fill="{PALETTE[j % len(PALETTE)]}"/>')  # fmt: skip
                parts.append(f'<text x="{left + w + 3:.1f}" y="{y + bar - 2}" font-size="8">'
                             f"{g[prov]:.0f}</text>")  # fmt: skip
            y += bar
        y += gap
    x100 = left + scale * 100
    parts.append(f'<line x1="{x100}" y1="30" x2="{x100}" y2="{y}" stroke="black" '
                 'stroke-dasharray="4,3"/>')  # fmt: skip
    for j, prov in enumerate(providers):
        parts.append(f'<rect x="{left + 120 * j}" y="{y + 10}" width="10" height="10" '
                     f'fill="{PALETTE[j % len(PALETTE)]}"/><text x="{left + 120 * j + 14}" '
                     f'y="{y + 19}" font-size="9">{escape(prov)}</text>')  # fmt: skip
    height = y + 40
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
           f'<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>')  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite_json")
    ap.add_argument("--out", default="docs/roofline.png")
    args = ap.parse_args(argv)
    payload = json.loads(Path(args.suite_json).read_text())
    groups, providers = collect(payload)
    if not groups:
        print("no rows with bytes or FLOPs in", args.suite_json)
        return 1
    out = Path(args.out)
    title = _title(payload)
    try:
        plot_matplotlib(groups, providers, title, out)
    except ImportError:
        out = out.with_suffix(".svg")
        plot_svg(groups, providers, title, out)
    print(f"wrote {out} ({len(groups)} cases, providers {', '.join(providers)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
