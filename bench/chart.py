"""Bar chart of the ratios ours/peer from a results JSON (run with the peers venv: matplotlib).

    bench/.venv-peers/bin/python -m bench.chart bench/results/latest.json bench/results/latest.png
"""

from __future__ import annotations

import json
import math
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as f:
        doc = json.load(f)
    labels, values, colors = [], [], []
    for sc in doc["scenarios"]:
        if sc["status"] != "ok":
            continue
        for peer, ratio in sc["ratios"].items():
            if math.isnan(ratio):
                continue
            good = ratio >= 1 if sc["better"] == "higher" else ratio <= 1
            labels.append(f"{sc['name']} vs {peer}" + (" (mem, lower better)" if sc["better"] == "lower" else ""))
            values.append(ratio)
            colors.append("tab:green" if good else "tab:orange")
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(labels), 4) + 1.5))
    if values:
        y = range(len(values))
        ax.barh(list(y), values, color=colors)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ratios (every scenario skipped)", ha="center", transform=ax.transAxes)
    skipped = [sc["name"] for sc in doc["scenarios"] if sc["status"] != "ok"]
    if skipped:
        fig.text(0.01, 0.005, "not run: " + ", ".join(skipped), fontsize=7, wrap=True)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ours / peer (log scale; 1 = parity)")
    mode = "QUICK" if doc.get("quick") else "full"
    ax.set_title(f"wmproxy-tw bench ({mode}, workers={doc.get('workers')}, {doc.get('git', '')}, {doc.get('started', '')})",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
