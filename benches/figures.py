#!/usr/bin/env python3
"""The figures of a benchmark run, as JSON and as PNG charts.

A bench script collects its figures and saves them in one place:

    import figures
    f = figures.Figures("vs-nats-mqtt", "fluxmesh against nats-server's MQTT gateway", {"devices": 10})
    f.bars("delivered", "msg/s", {"fluxmesh": 1234.0, "nats-server MQTT": 1000.0})
    f.series("throughput over time", "msg/s", {"fluxmesh": [[1, 980], [2, 1010]]}, x_label="s")
    f.cdf("latency, publish to subscriber", "ms", {"fluxmesh": [[0.5, 3.1], [0.99, 9.0]]})
    f.save(out_dir)

`save` writes out_dir/figures.json (every chart's data, the run's
parameters and when it ran) and draws one PNG per chart,
out_dir/{bench}-{n}-{slug}.png, with matplotlib. Kinds of chart: `bars`
(same-run comparisons: one value per label), `series` (a value over time,
one line per label) and `cdf` (latency quantiles, one curve per label,
the tail on a log scale).

Redraw the charts of a saved run:  python3 benches/figures.py DIR
"""
import datetime
import json
import os
import re
import sys


class Figures:
    def __init__(self, bench, title, params=None):
        self.doc = {
            "bench": bench,
            "title": title,
            "params": params or {},
            "ran_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "charts": [],
        }

    def _add(self, kind, title, unit, data, **extra):
        if not data:
            return
        chart = {"kind": kind, "title": title, "unit": unit, "data": data}
        chart.update(extra)
        self.doc["charts"].append(chart)

    def bars(self, title, unit, values, note=None):
        """values: {label: number}; a label with None is left out."""
        self._add("bars", title, unit, {k: v for k, v in values.items() if v is not None}, note=note)

    def series(self, title, unit, lines, x_label="s"):
        """lines: {label: [[x, y], ...]}."""
        self._add("series", title, unit, {k: v for k, v in lines.items() if v}, x_label=x_label)

    def cdf(self, title, unit, curves):
        """curves: {label: [[quantile, value], ...]}, quantile in (0, 1]."""
        self._add("cdf", title, unit, {k: v for k, v in curves.items() if v})

    def save(self, out):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "figures.json"), "w") as f:
            json.dump(self.doc, f, indent=1)
        drawn = draw(self.doc, out)
        print(f"figures: {os.path.join(out, 'figures.json')}", file=sys.stderr)
        for path in drawn:
            print(f"chart: {path}", file=sys.stderr)
        return drawn


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def draw(doc, out):
    """One PNG per chart of `doc` in `out`; their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figures.json written, no charts", file=sys.stderr)
        return []
    paths = []
    for n, chart in enumerate(doc["charts"], 1):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        kind, data, unit = chart["kind"], chart["data"], chart["unit"]
        if kind == "bars":
            labels = list(data)
            values = [data[k] for k in labels]
            bars = ax.bar(labels, values, color=[colour(i) for i in range(len(labels))])
            for b, v in zip(bars, values):
                ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=9)
            ax.set_ylabel(unit)
            ax.margins(y=0.15)
            if chart.get("note"):
                ax.set_xlabel(chart["note"], fontsize=8)
        elif kind == "series":
            for i, (label, points) in enumerate(data.items()):
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label, color=colour(i), lw=1.4)
            ax.set_xlabel(chart.get("x_label", ""))
            ax.set_ylabel(unit)
            top = max((p[1] for points in data.values() for p in points), default=0)
            ax.set_ylim(0, top * 1.15 if top > 0 else 1)
            ax.legend(fontsize=8)
        elif kind == "cdf":
            # x: the share of messages at or below y; logit-like spacing of
            # the tail by plotting against -log10(1 - q).
            import math
            for i, (label, points) in enumerate(data.items()):
                xs = [min(4.0, -math.log10(max(1e-4, 1 - p[0]))) for p in points]
                ax.plot(xs, [p[1] for p in points], label=label, color=colour(i), lw=1.4, marker=".", ms=3)
            ticks = [0.5, 0.9, 0.99, 0.999, 0.9999]
            ax.set_xticks([-math.log10(1 - t) for t in ticks])
            ax.set_xticklabels([f"p{t * 100:g}" for t in ticks])
            ax.set_ylabel(unit)
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set_title(f"{doc['bench']}: {chart['title']}", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, f"{doc['bench']}-{n}-{slug(chart['title'])}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def colour(i):
    return ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"][i % 7]


def fmt(v):
    if isinstance(v, float) and abs(v) < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def loadgen_lines(outcome):
    """A loadgen `--report json` outcome (`mesh`, `jetstream`) as chart
    data: (messages per second over time, latency CDF in ms). Per second
    is what the subscriber received when there was one, else the acks."""
    by = "received" if outcome.get("delivered_rate") is not None else "acked"
    series = [[s["t"], s[by]] for s in outcome.get("per_second") or []]
    cdf = [[q, v / 1000.0] for q, v in outcome.get("latency_cdf_us") or []]
    return series, cdf


def loadgen_variants(f, out, labels, rate="acked_rate", what="acknowledged throughput"):
    """Charts from the loadgen reports (`--report json`) a bench saved as
    out/round{R}-{variant}.json: the median `rate` of each variant over
    the rounds (bars) and, from the last round of each, throughput over
    time and the latency CDF. labels: {variant: label}, in chart order.
    Returns {variant: median} (None where no run of it succeeded)."""
    import glob
    import statistics
    runs = {v: [] for v in labels}
    for path in sorted(glob.glob(os.path.join(out, "round*-*.json"))):
        variant = os.path.basename(path)[:-5].split("-", 1)[1]
        if variant not in runs:
            continue
        try:
            with open(path) as fh:
                runs[variant].append(json.load(fh)["mesh"])
        except (ValueError, KeyError, TypeError):
            continue
    medians = {v: (statistics.median(o[rate] for o in r) if r else None) for v, r in runs.items()}
    f.bars(f"{what}, median of {max((len(r) for r in runs.values()), default=0)} rounds", "msg/s",
           {labels[v]: m for v, m in medians.items()})
    last = {labels[v]: loadgen_lines(r[-1]) for v, r in runs.items() if r}
    f.series("throughput over time (last round)", "msg/s", {k: v[0] for k, v in last.items()})
    f.cdf("latency, publish to subscriber (last round)", "ms", {k: v[1] for k, v in last.items()})
    return medians


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: figures.py DIR   (redraws DIR/figures.json)")
    with open(os.path.join(sys.argv[1], "figures.json")) as f:
        for p in draw(json.load(f), sys.argv[1]):
            print(p)
