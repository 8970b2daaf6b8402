"""Bar charts of a GPU benchmark's JSON, one bar per implementation: bench/gpu_check.py's forward,
bench/gpu_backward.py's backward or bench/ab_compare.py's forward or backward (--direction; TFLOP/s by sequence
length, one panel per (head dim, causal), as in FlashAttention's README), or bench/decode.py's decode (TB/s of K
and V read by (batch, cache length), one panel per (query heads / kv heads, head dim)).

    python bench/plot.py RESULT.json OUT.png [--title TEXT] [--direction fwd|bwd]
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Every column a benchmark may have; a chart shows those its rows carry.
IMPLEMENTATIONS = [("ours", "FlashAttention-Plus"), ("ours_mma_sync", "FlashAttention-Plus, portable mma.sync kernel"),
                   ("ours_deterministic", "FlashAttention-Plus, deterministic"), ("flaggems", "FlagGems (Triton)"),
                   ("sdpa_flash", "torch SDPA flash (FA2)"), ("sdpa_cudnn", "torch SDPA cuDNN"),
                   ("fa4", "FlashAttention-4")]


# bench/decode.py's columns.
DECODE_IMPLEMENTATIONS = [("ours_dense", "FlashAttention-Plus"), ("ours_paged16", "FlashAttention-Plus, paged (16)"),
                          ("sdpa_flash", "torch SDPA flash (FA2)"), ("cudnn", "torch SDPA cuDNN")]


def chart_title(title, result):
    torch_version = f", torch {result['torch']}" if result.get("torch") else ""
    return f"{title} — {result.get('device', '')}{torch_version}"


def draw_bars(axis, rows, implementations, value, label_format=None):
    """One group of bars per row, one bar per implementation; value(row, key) gives a bar's height."""
    width = 0.8 / len(implementations)
    for index, (key, label) in enumerate(implementations):
        positions = [i + (index - (len(implementations) - 1) / 2) * width for i in range(len(rows))]
        bars = axis.bar(positions, [value(row, key) or 0 for row in rows], width, label=label)
        if label_format:
            axis.bar_label(bars, fmt=label_format, fontsize=6)


def decode_chart(result, args):
    panels = {}
    for row in result["rows"]:
        panels.setdefault((row["heads"], row["heads_k"], row["head_dim"]), []).append(row)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, ((heads, heads_k, dim), rows) in zip(axes[0], panels.items()):
        draw_bars(axis, rows, DECODE_IMPLEMENTATIONS, lambda row, key: row.get(key))
        axis.set_xticks(range(len(rows)), [f"b{row['batch']}\n{row['cache'] // 1024}k" for row in rows], fontsize=8)
        axis.set_title(f"heads {heads}/{heads_k}, d {dim}", fontsize=9)
        axis.set_ylabel("TB/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(DECODE_IMPLEMENTATIONS), fontsize=8)
    figure.suptitle(chart_title(args.title, result), fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(args.png, dpi=110)


def ab_compare_rows(result, direction):
    """bench/ab_compare.py's rows of one direction in the other benchmarks' form, and its implementations (the
    library's builds by their names first)."""
    builds = [build.split("=", 1)[0] for build in result["builds"]]
    prefix = direction + "_"
    rows = [{"d": row["head_dim"], "seqlen": row["seqlen"], "causal": row["causal"],
             **{key[len(prefix):]: value for key, value in row.items() if key.startswith(prefix)}}
            for row in result["rows"]]
    labels = [(build, f"FlashAttention-Plus ({build})") for build in builds]
    return rows, labels + [entry for entry in IMPLEMENTATIONS if entry[0] not in builds]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("png")
    parser.add_argument("--title", default="")
    parser.add_argument("--direction", default="fwd", help="bench/ab_compare.py's results: fwd or bwd")
    args = parser.parse_args()
    with open(args.result) as handle:
        result = json.load(handle)
    if "builds" in result:
        rows, candidates = ab_compare_rows(result, args.direction)
        result.setdefault("device", result.get("gpu", ""))
    elif "benchmark" in result:
        rows, candidates = result["benchmark"], IMPLEMENTATIONS
    else:
        decode_chart(result, args)
        return
    implementations = [(key, label) for key, label in candidates if any(row.get(key + "_tflops") for row in rows)]
    head_dims = sorted({row["d"] for row in rows})
    figure, axes = plt.subplots(2, len(head_dims), figsize=(4.2 * len(head_dims), 6.4), sharey=True, squeeze=False)
    for (column, head_dim), (line, causal) in ((c, l) for c in enumerate(head_dims) for l in enumerate((False, True))):
        axis = axes[line][column]
        selected = sorted((row for row in rows if row["d"] == head_dim and row["causal"] == causal),
                          key=lambda row: row["seqlen"])
        draw_bars(axis, selected, implementations, lambda row, key: row.get(key + "_tflops"), "%.0f")
        axis.set_xticks(range(len(selected)), [f"{row['seqlen'] // 1024}k" for row in selected])
        axis.set_title(f"d={head_dim}, {'causal' if causal else 'non-causal'}", fontsize=9)
        axis.set_xlabel("sequence length (batch x seqlen = 16k)", fontsize=8)
    for line in axes:
        line[0].set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7, loc="upper left")
    figure.suptitle(chart_title(args.title, result), fontsize=10)
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
