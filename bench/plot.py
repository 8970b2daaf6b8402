"""Bar charts of a GPU benchmark's JSON (bench/gpu_check.py's forward or bench/gpu_backward.py's backward):
TFLOP/s by sequence length, one bar per implementation, one panel per (head dim, causal), as in
FlashAttention's README.

    python bench/plot.py RESULT.json OUT.png [--title TEXT]
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Every column a benchmark may have; a chart shows those its rows carry.
IMPLEMENTATIONS = [("ours", "FlashAttention-Plus"), ("ours_mma_sync", "FlashAttention-Plus, portable mma.sync kernel"),
                   ("ours_deterministic", "FlashAttention-Plus, deterministic"), ("flaggems", "FlagGems (Triton)"),
                   ("sdpa_flash", "torch SDPA flash (FA2)"), ("sdpa_cudnn", "torch SDPA cuDNN")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("png")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    with open(args.result) as handle:
        result = json.load(handle)
    rows = result["benchmark"]
    implementations = [(key, label) for key, label in IMPLEMENTATIONS if any(row.get(key + "_tflops") for row in rows)]
    head_dims = sorted({row["d"] for row in rows})
    figure, axes = plt.subplots(2, len(head_dims), figsize=(4.2 * len(head_dims), 6.4), sharey=True, squeeze=False)
    for (column, head_dim), (line, causal) in ((c, l) for c in enumerate(head_dims) for l in enumerate((False, True))):
        axis = axes[line][column]
        selected = sorted((row for row in rows if row["d"] == head_dim and row["causal"] == causal),
                          key=lambda row: row["seqlen"])
        width = 0.8 / len(implementations)
        for index, (key, label) in enumerate(implementations):
            values = [row.get(key + "_tflops") or 0 for row in selected]
            positions = [i + (index - (len(implementations) - 1) / 2) * width for i in range(len(selected))]
            bars = axis.bar(positions, values, width, label=label)
            axis.bar_label(bars, fmt="%.0f", fontsize=6)
        axis.set_xticks(range(len(selected)), [f"{row['seqlen'] // 1024}k" for row in selected])
        axis.set_title(f"d={head_dim}, {'causal' if causal else 'non-causal'}", fontsize=9)
        axis.set_xlabel("sequence length (batch x seqlen = 16k)", fontsize=8)
    for line in axes:
        line[0].set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"{args.title} — {result.get('device', '')}, torch {result.get('torch', '')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
