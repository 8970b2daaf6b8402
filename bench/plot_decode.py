"""Bar chart of bench/decode.py's JSON: decode bandwidth (TB/s of K and V read) per (batch, cache length), one
bar per implementation, one panel per (query heads / kv heads, head dim).

    python bench/plot_decode.py RESULT.json OUT.png [--title TEXT]
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLEMENTATIONS = [("ours_dense", "FlashAttention-Plus"), ("ours_paged16", "FlashAttention-Plus, paged (16)"),
                   ("sdpa_flash", "torch SDPA flash (FA2)"), ("cudnn", "torch SDPA cuDNN")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("png")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    with open(args.result) as handle:
        result = json.load(handle)
    panels = {}
    for row in result["rows"]:
        panels.setdefault((row["heads"], row["heads_k"], row["head_dim"]), []).append(row)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    width = 0.8 / len(IMPLEMENTATIONS)
    for axis, ((heads, heads_k, dim), rows) in zip(axes[0], panels.items()):
        for index, (key, label) in enumerate(IMPLEMENTATIONS):
            values = [row.get(key) or 0.0 for row in rows]
            positions = [x + (index - (len(IMPLEMENTATIONS) - 1) / 2) * width for x in range(len(rows))]
            axis.bar(positions, values, width, label=label)
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels([f"b{row['batch']}\n{row['cache'] // 1024}k" for row in rows], fontsize=8)
        axis.set_title(f"heads {heads}/{heads_k}, d {dim}", fontsize=9)
        axis.set_ylabel("TB/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(IMPLEMENTATIONS), fontsize=8)
    figure.suptitle(args.title or f"Decode, {result.get('dtype', '')}, {result.get('device', '')}", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
