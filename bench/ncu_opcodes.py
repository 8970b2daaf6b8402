"""Executed instructions and warp-stall samples per SASS opcode of two kernels, from ncu's source page
(`ncu -i REPORT --page source --csv --print-source sass > FILE.csv`, a report taken with --section
SourceCounters), side by side: where one kernel's instruction count differs from another's.

    python bench/ncu_opcodes.py ours.csv fa2.csv
"""
import argparse
import collections
import csv


def opcode_totals(path):
    """{opcode: executed warp instructions}, {opcode: stall samples} of one kernel's source page."""
    rows = list(csv.reader(open(path)))
    header = rows[1]
    source, executed, stalls = (header.index(name) for name in
                                ("Source", "Instructions Executed", "Warp Stall Sampling (All Samples)"))
    counts, samples = collections.Counter(), collections.Counter()
    for row in rows[2:]:
        if len(row) <= executed or not row[source].strip():
            continue
        words = row[source].split()
        opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        counts[opcode] += int(row[executed].replace(",", "") or 0)
        samples[opcode] += int(row[stalls].replace(",", "") or 0)
    return counts, samples


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    (a, a_stalls), (b, b_stalls) = opcode_totals(args.first), opcode_totals(args.second)
    total_stalls = (sum(a_stalls.values()) or 1, sum(b_stalls.values()) or 1)
    print(f"executed: {sum(a.values()) / 1e6:.1f} M vs {sum(b.values()) / 1e6:.1f} M")
    print(f"{'opcode':10s} {'first M':>8s} {'second M':>9s} {'diff M':>8s} {'first stall %':>14s} {'second stall %':>15s}")
    for opcode in sorted(set(a) | set(b), key=lambda o: -(a[o] + b[o]))[:args.rows]:
        print(f"{opcode:10s} {a[opcode] / 1e6:8.1f} {b[opcode] / 1e6:9.1f} {(a[opcode] - b[opcode]) / 1e6:8.1f} "
              f"{100 * a_stalls[opcode] / total_stalls[0]:14.1f} {100 * b_stalls[opcode] / total_stalls[1]:15.1f}")


if __name__ == "__main__":
    main()
