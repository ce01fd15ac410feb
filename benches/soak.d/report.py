#!/usr/bin/env python3
"""benches/soak's verdict, figures and plot, from what the run left in
--dir: meta.json (the run's settings), samples.jsonl (sampler.py),
segments.jsonl (segment.py) and final-drain.json (drain.py).

Verdict, each PASS or FAIL:
  1. memory flat: per node, the drift of its RSS after the warm-up (meta
     warmup_s: 10 minutes, or the first 20% of a shorter run), within one
     process (PID): a node started again by a fault has its own warm-up,
     and of a node's PIDs the one with the longest stretch of samples
     after its warm-up is compared. Only samples taken while load ran.
     The drift is the trend's: the Theil-Sen slope of RSS over time (the
     median of the slopes between every two samples, which steps at
     faults do not sway) times the span, against the fitted RSS at the
     span's start; at most meta rss_drift_max_pct (+5%). RSS moves by
     several MiB from one minute to the next at the same load (allocator
     pages taken and given back around faults), so the end against the
     start (each the median of up to 3 samples) is shown beside it but
     does not decide.
  2. no lag growth: after every segment's load, and at the end, the
     consumer lag and the history writer queue summed over the nodes came
     back to at most meta lag_ok messages / queue_ok batches within
     drain_timeout_s; the last sample agrees.
  3. nothing lost: no PUBACKed message missing and none applied twice, over
     every segment's chaos load and JSON load.
  4. every fault's invariants held: every chaos script exited 0 with
     verdict PASS, and every JSON load verified clean.
  5. processing on: rules ran, aggregation updated windows, history rows
     were written.
Writes summary.json, summary.md (figures for the README) and soak.png
(matplotlib, when importable). Exits 1 on FAIL.

    report.py --dir DIR
"""
import argparse
import json
import math
import os
import statistics
import sys


def load_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return rows


def load_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def fmt(v, digits=0):
    if v is None:
        return "?"
    if isinstance(v, float):
        if math.isnan(v):
            return "?"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rate_why(meta):
    """Where the soak's rate came from, in words."""
    if meta["rate_source"] == "measured":
        return f"half the measured maximum of {meta['max_rate']} msg/s"
    if meta["rate_source"] == "disk":
        return (f"bounded by the disk: {meta['bytes_per_message']} bytes stored per message, every copy, "
                f"and at most half the free space filled; the measured maximum was {meta['max_rate']} msg/s")
    return "given"


def theil_sen(points):
    """The median of the slopes between every two points (t, y) with
    different t: a trend that a few steps and outliers do not sway."""
    slopes = [(y2 - y1) / (t2 - t1) for i, (t1, y1) in enumerate(points)
              for t2, y2 in points[i + 1:] if t2 != t1]
    return statistics.median(slopes) if slopes else 0.0


def memory(meta, samples, node):
    """The RSS comparison for one node: the PID with the longest stretch of
    in-load samples after its warm-up."""
    warmup = meta["warmup_s"]
    by_pid = {}
    for s in samples:
        n = s["nodes"].get(node)
        if not n or not n.get("pid") or n.get("rss_kib") is None:
            continue
        by_pid.setdefault(n["pid"], []).append((s["t"], s["phase"], n["rss_kib"], n.get("fds"),
                                                n.get("connections"), n.get("shards")))
    best = None
    for pid, rows in by_pid.items():
        first_seen = max(meta["t0"], rows[0][0])
        ok = [r for r in rows if r[1] == "load" and r[0] >= first_seen + warmup]
        if len(ok) < 2:
            continue
        span = ok[-1][0] - ok[0][0]
        if best is None or span > best[0]:
            best = (span, pid, ok)
    result = {"node": node, "pids": sorted(by_pid), "measured": best is not None}
    if best is None:
        result["why"] = "no process of this node has 2 samples under load after its warm-up"
        return result
    span, pid, ok = best
    k = max(1, min(3, len(ok) // 2))
    base = statistics.median(r[2] for r in ok[:k])
    end = statistics.median(r[2] for r in ok[-k:])
    fds_base = median([r[3] for r in ok[:k]])
    fds_end = median([r[3] for r in ok[-k:]])
    # What the node held at each end: RSS follows connections and shards,
    # which faults move between nodes.
    held = {f"{what}_{end_}": median([r[i] for r in rows_])
            for what, i in (("connections", 4), ("shards", 5))
            for end_, rows_ in (("base", ok[:k]), ("end", ok[-k:]))}
    drift = (end - base) / base * 100 if base else None
    slope = theil_sen([(r[0], r[2]) for r in ok])
    fit_start = statistics.median(r[2] - slope * (r[0] - ok[0][0]) for r in ok)
    trend = slope * span / fit_start * 100 if fit_start else None
    result.update({
        "pid": pid,
        "samples": len(ok),
        "from_s": round(ok[0][0] - meta["t0"]),
        "to_s": round(ok[-1][0] - meta["t0"]),
        "span_min": round(span / 60, 1),
        "rss_base_mib": round(base / 1024, 1),
        "rss_end_mib": round(end / 1024, 1),
        "end_vs_start_pct": None if drift is None else round(drift, 2),
        "rss_fit_start_mib": round(fit_start / 1024, 1),
        "rss_fit_end_mib": round((fit_start + slope * span) / 1024, 1),
        "drift_pct": None if trend is None else round(trend, 2),
        "fds_base": fds_base,
        "fds_end": fds_end,
        **held,
        "ok": trend is not None and trend <= meta["rss_drift_max_pct"],
    })
    return result


def counter_growth(samples, node_ids, key):
    """What a counter grew by over the run, summed over the nodes' processes
    (one started since the first sample counted from zero)."""
    if not samples:
        return None
    first_pids = {i: samples[0]["nodes"].get(i, {}).get("pid") for i in node_ids}
    growth = 0.0
    seen = False
    for i in node_ids:
        series = {}
        for s in samples:
            n = s["nodes"].get(i) or {}
            v = (n.get("counters") or {}).get(key)
            if n.get("pid") and v is not None:
                series.setdefault(n["pid"], []).append(v)
        for pid, vs in series.items():
            seen = True
            growth += (vs[-1] - vs[0]) if pid == first_pids.get(i) else vs[-1]
    return growth if seen else None


def thirds(values):
    """(median of the first third, median of the last third)."""
    values = [v for v in values if v is not None]
    if len(values) < 3:
        return None, None
    k = len(values) // 3
    return statistics.median(values[:k]), statistics.median(values[-k:])


def plot(meta, samples, segments, node_ids, mem, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"not drawn (matplotlib: {e})"
    t0 = meta["t0"]
    x = [(s["t"] - t0) / 60 for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(11, 14), sharex=True)
    ax_rss, ax_fd, ax_lag, ax_pg, ax_lat = axes

    def series(node, key, scale=1.0):
        out = []
        for s in samples:
            v = (s["nodes"].get(node) or {}).get(key)
            out.append(float("nan") if v is None else v * scale)
        return out

    for i in node_ids:
        line, = ax_rss.plot(x, series(i, "rss_kib", 1 / 1024), marker=".", label=f"node-{i}")
        # A new PID: the node was started again.
        last = None
        for s, xi in zip(samples, x):
            pid = (s["nodes"].get(i) or {}).get("pid")
            if last is not None and pid and pid != last:
                ax_rss.axvline(xi, color=line.get_color(), linestyle=":", alpha=0.6)
            last = pid or last
        # The trend the memory verdict is on, over the span it compares.
        m = next((m for m in mem if m["node"] == i and m.get("drift_pct") is not None), None)
        if m:
            ax_rss.plot([m["from_s"] / 60, m["to_s"] / 60], [m["rss_fit_start_mib"], m["rss_fit_end_mib"]],
                        color=line.get_color(), linestyle="--", linewidth=2)
        ax_fd.plot(x, series(i, "fds"), marker=".", label=f"node-{i}")
        ax_lag.plot(x, series(i, "shard_lag"), marker=".", alpha=0.6, label=f"node-{i}")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.axvspan(0, meta["warmup_s"] / 60, color="grey", alpha=0.12, label="warm-up")
    ax_rss.set_title(f"benches/soak: {meta['hours']:g} h, {meta['rate']} msg/s QoS1 "
                     f"({meta['rate_source']}), {meta['devices']}+{meta['devices']} devices, "
                     f"a fault every {meta['fault_every']} s\ndotted: node started again; dashed: the RSS trend the verdict is on")
    ax_fd.set_ylabel("open files")
    cl = [s["cluster"].get("consumer_lag") for s in samples]
    ax_lag.plot(x, [float("nan") if v is None else v for v in cl], color="black", marker=".", label="cluster")
    ax_lag.set_ylabel("consumer lag (msgs)")
    ax_lag.set_yscale("symlog", linthresh=10)
    q = [s["cluster"].get("pg_writer_queue") for s in samples]
    ax_pg.plot(x, [float("nan") if v is None else v for v in q], color="tab:purple", marker=".",
               label="writer queue (batches)")
    ax_pg.set_ylabel("writer queue (batches)")
    ax_pg2 = ax_pg.twinx()
    for key, style in (("pg_write_lag_p50_ms", "--"), ("pg_write_lag_p99_ms", "-")):
        v = [s["cluster"].get(key) for s in samples]
        ax_pg2.plot(x, [float("nan") if y is None else y for y in v], color="tab:brown", linestyle=style,
                    label=key.replace("pg_write_lag_", "write lag ").replace("_ms", ""))
    ax_pg2.set_ylabel("history write lag (ms)")
    h1, l1 = ax_pg.get_legend_handles_labels()
    h2, l2 = ax_pg2.get_legend_handles_labels()
    ax_pg.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    for key, style in (("puback_p50_ms", "--"), ("puback_p99_ms", "-")):
        v = [s["cluster"].get(key) for s in samples]
        ax_lat.plot(x, [float("nan") if y is None else y for y in v], linestyle=style, marker=".",
                    label=key.replace("puback_", "PUBACK ").replace("_ms", ""))
    ax_lat.set_ylabel("PUBACK latency (ms)\nreceipt -> JetStream ack")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("minutes since the soak began")
    colors = {"kill-node": "tab:red", "pause-node": "tab:orange", "kill-nats": "tab:blue",
              "kill-pg-primary": "tab:green"}
    for seg in segments:
        at = seg.get("fault_at")
        if at is None:
            continue
        xi = (at - t0) / 60
        c = colors.get(seg["kind"], "grey")
        for ax in axes:
            ax.axvline(xi, color=c, alpha=0.35, linewidth=1)
        ax_rss.annotate(seg["kind"] + ("" if seg.get("verdict") == "PASS" else " (FAIL)"), (xi, 1.0),
                        xycoords=("data", "axes fraction"), rotation=90, fontsize=7, va="top", ha="right",
                        color=c)
    for ax in (ax_rss, ax_fd, ax_lag, ax_lat):
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    ax_pg.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    meta = load_json(os.path.join(a.dir, "meta.json"), {})
    samples = load_jsonl(os.path.join(a.dir, "samples.jsonl"))
    segments = load_jsonl(os.path.join(a.dir, "segments.jsonl"))
    final_drain = load_json(os.path.join(a.dir, "final-drain.json"), {"ok": False})
    node_ids = meta.get("nodes") or sorted({i for s in samples for i in s["nodes"]}, key=int)
    lag_ok, queue_ok = meta["lag_ok"], meta["queue_ok"]

    checks = []

    # 1. Memory.
    mem = [memory(meta, samples, i) for i in node_ids]
    mem_ok = bool(mem) and all(m.get("ok") for m in mem)
    checks.append(("memory flat (RSS trend <= +%g%% within one PID, after the warm-up)" % meta["rss_drift_max_pct"],
                   mem_ok, "; ".join(
                       f"node-{m['node']} pid {m['pid']}: trend {m['rss_fit_start_mib']} -> {m['rss_fit_end_mib']} MiB "
                       f"({m['drift_pct']:+.2f}%, {m['span_min']} min; end against start {m['rss_base_mib']} -> "
                       f"{m['rss_end_mib']} MiB, {m['end_vs_start_pct']:+.2f}%)"
                       if m["measured"] and m.get("drift_pct") is not None
                       else f"node-{m['node']}: not measured ({m.get('why', 'no RSS')})" for m in mem)))

    # 2. Lag back to zero after every fault, and at the end.
    not_drained = [s["index"] for s in segments if not (s.get("drain") or {}).get("ok")]
    last = samples[-1] if samples else None
    last_ok = bool(last) and last["cluster"].get("nodes_scraped") == len(node_ids) and \
        (last["cluster"].get("consumer_lag") or 0) <= lag_ok and (last["cluster"].get("pg_writer_queue") or 0) <= queue_ok
    lag_pass = bool(segments) and not not_drained and bool(final_drain.get("ok")) and last_ok
    drains = [s["drain"].get("waited_ms") for s in segments if (s.get("drain") or {}).get("ok")]
    checks.append((f"no lag growth (consumer lag <= {lag_ok:g} msgs and writer queue <= {queue_ok:g} batches "
                   f"within {meta['drain_timeout_s']} s of each load's end, and at the end)", lag_pass,
                   f"segments not drained: {not_drained or 'none'}; drain ms median {fmt(median(drains))} max "
                   f"{fmt(max(drains) if drains else None)}; final: lag {fmt(final_drain.get('consumer_lag'))}, "
                   f"queue {fmt(final_drain.get('pg_writer_queue'))}; last sample: lag "
                   f"{fmt(last['cluster'].get('consumer_lag') if last else None)}, queue "
                   f"{fmt(last['cluster'].get('pg_writer_queue') if last else None)}"))

    # 3. Nothing lost.
    def tot(part, key):
        vs = [(s.get(part) or {}).get(key) for s in segments]
        return None if any(v is None for v in vs) else sum(vs)

    totals = {f"{part}_{key}": tot(part, key) for part in ("chaos", "json_load")
              for key in ("sent", "acked", "stored", "lost", "stored_twice", "applied_behind", "applied_twice",
                          "duplicate_state_frames", "missing_state_frames")}
    lost = [totals["chaos_lost"], totals["json_load_lost"], totals["chaos_applied_twice"],
            totals["json_load_applied_twice"]]
    lost_ok = bool(segments) and all(v == 0 for v in lost)
    checks.append(("nothing lost (PUBACKed but missing + applied twice, over every load)", lost_ok,
                   f"lost {fmt(totals['chaos_lost'])} + {fmt(totals['json_load_lost'])} (chaos + JSON load) of "
                   f"{fmt(totals['chaos_acked'])} + {fmt(totals['json_load_acked'])} acknowledged; applied twice "
                   f"{fmt(totals['chaos_applied_twice'])} + {fmt(totals['json_load_applied_twice'])}"
                   + (" (?: a report was unreadable)" if any(v is None for v in lost) else "")))

    # 4. Every fault's invariants.
    bad = [f"{s['index']} {s['kind']} ({s['verdict']})" for s in segments if s.get("verdict") != "PASS"]
    bad += [f"{s['index']} JSON load" for s in segments if not (s.get("json_load") or {}).get("ok")]
    checks.append(("every fault's invariants held (chaos verdicts, JSON load verified)", bool(segments) and not bad,
                   f"{len(segments)} segments; failed: {', '.join(bad) if bad else 'none'}"))

    # 5. Processing on.
    growth = {k: counter_growth(samples, node_ids, k) for k in
              ("ingested", "processed", "rule_runs", "rule_errors", "agg_updates", "pg_rows_written",
               "pg_write_errors", "derived_state", "derived_event", "derived_alert", "derived_agg", "derived_error")}
    on_ok = all((growth.get(k) or 0) > 0 for k in ("rule_runs", "agg_updates", "pg_rows_written"))
    checks.append(("rules, aggregation and history on", on_ok,
                   f"rule runs {fmt(growth['rule_runs'])} (errors {fmt(growth['rule_errors'] or 0)}), alerts "
                   f"{fmt(growth['derived_alert'] or 0)}, events {fmt(growth['derived_event'] or 0)}; aggregated "
                   f"values {fmt(growth['agg_updates'])}, windows closed {fmt(growth['derived_agg'] or 0)}; history "
                   f"rows {fmt(growth['pg_rows_written'])} (write errors, retried: {fmt(growth['pg_write_errors'] or 0)})"))

    verdict = "PASS" if all(ok for _, ok, _ in checks) else "FAIL"

    # Trends (not judged).
    load_samples = [s for s in samples if s["phase"] == "load"]
    trends = {
        "consumer_lag_under_load": thirds([s["cluster"].get("consumer_lag") for s in load_samples]),
        "puback_p50_ms": thirds([s["cluster"].get("puback_p50_ms") for s in load_samples]),
        "puback_p99_ms": thirds([s["cluster"].get("puback_p99_ms") for s in load_samples]),
        "pg_write_lag_p99_ms": thirds([s["cluster"].get("pg_write_lag_p99_ms") for s in load_samples]),
    }

    png = plot(meta, samples, segments, node_ids, mem, os.path.join(a.dir, "soak.png"))
    # Faults came every fault_every s, or later when a segment ran over.
    fault_times = [s["fault_at"] for s in segments if s.get("fault_at")]
    gaps = [b - c for c, b in zip(fault_times, fault_times[1:])]
    fault_gap = round(statistics.mean(gaps)) if gaps else None

    # Printed.
    print()
    print(f"soak: {meta['hours']:g} h from {meta['started_iso']}; {meta['rate']} msg/s QoS1 ({meta['rate_source']}"
          + (f", measured maximum {meta['max_rate']} msg/s" if meta.get("max_rate") else "") + f"): chaos load "
          f"{meta['chaos_rate']} msg/s binary + JSON load {meta['json_rate']} msg/s, {meta['devices']} devices each; "
          f"{len(segments)} faults ({', '.join(meta['kinds'])}), one every {fmt(fault_gap)} s on average "
          f"(planned {meta['fault_every']}), {len(samples)} samples")
    print()
    print(f"{'node':<7} {'pid compared':>12} {'min':>6} {'trend MiB from':>14} {'to':>6} {'drift':>8} "
          f"{'RSS MiB from':>13} {'to':>6} {'end/start':>9} "
          f"{'fds from':>9} {'to':>5} {'conns from':>10} {'to':>5} {'shards from':>11} {'to':>5} {'PIDs':>5}")
    for m in mem:
        if m["measured"]:
            print(f"node-{m['node']:<2} {m['pid']:>12} {m['span_min']:>6} {m['rss_fit_start_mib']:>14} "
                  f"{m['rss_fit_end_mib']:>6} {fmt(m['drift_pct'], 2):>7}% {m['rss_base_mib']:>13} "
                  f"{m['rss_end_mib']:>6} {fmt(m['end_vs_start_pct'], 2):>8}% {fmt(m['fds_base']):>9} "
                  f"{fmt(m['fds_end']):>5} {fmt(m.get('connections_base')):>10} {fmt(m.get('connections_end')):>5} "
                  f"{fmt(m.get('shards_base')):>11} {fmt(m.get('shards_end')):>5} {len(m['pids']):>5}")
        else:
            print(f"node-{m['node']:<2} not measured: {m['why']}")
    print()
    print(f"{'#':>3} {'kind':<16} {'verdict':<7} {'failover ms':>11} {'recovery ms':>11} {'acked':>10} "
          f"{'lost':>5} {'twice':>5} {'JSON acked':>10} {'JSON lost':>9} {'drain ms':>9} {'lag':>5}")
    for s in segments:
        c, j, d = s.get("chaos") or {}, s.get("json_load") or {}, s.get("drain") or {}
        print(f"{s['index']:>3} {s['kind']:<16} {s['verdict']:<7} {fmt(s.get('failover_ms')):>11} "
              f"{fmt(s.get('recovery_ms')):>11} {fmt(c.get('acked')):>10} {fmt(c.get('lost')):>5} "
              f"{fmt(c.get('applied_twice')):>5} {fmt(j.get('acked')):>10} {fmt(j.get('lost')):>9} "
              f"{fmt(d.get('waited_ms')) if d.get('ok') else 'NOT':>9} {fmt(d.get('consumer_lag')):>5}")
    print()
    for name, (first, last_) in trends.items():
        print(f"trend {name}: first third median {fmt(first, 1)}, last third {fmt(last_, 1)} (not judged)")
    print()
    for name, ok, detail in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")
        print(f"       {detail}")
    print()

    summary = {
        "verdict": verdict,
        "meta": meta,
        "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks],
        "memory": mem,
        "totals": totals,
        "pipeline": growth,
        "trends": {k: {"first_third": v[0], "last_third": v[1]} for k, v in trends.items()},
        "final_drain": final_drain,
        "fault_every_actual_s": fault_gap,
        "segments": segments,
        "samples": len(samples),
        "plot": png,
    }
    with open(os.path.join(a.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    md = [f"Soak (`benches/soak --hours {meta['hours']:g}"
          + ("" if meta["rate_source"] in ("measured", "disk") else f" --rate {meta['rate']}") + "`): "
          f"{meta['rate']} msg/s QoS1 ({rate_why(meta)}), "
          f"rules, aggregation and Postgres on, a fault every {meta['fault_every']} s "
          f"({', '.join(meta['kinds'])}, {len(segments)} in all, one every {fmt(fault_gap)} s on average). "
          f"Verdict: **{verdict}**.", "",
          "| node | PID compared | minutes | RSS trend, MiB | drift (trend) | RSS MiB after warm-up → at the end | end against start | open files | MQTT connections | shards run |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for m in mem:
        if m["measured"]:
            md.append(f"| node-{m['node']} | {m['pid']} | {m['span_min']} | {m['rss_fit_start_mib']} → {m['rss_fit_end_mib']} "
                      f"| {m['drift_pct']:+.2f}% | {m['rss_base_mib']} → {m['rss_end_mib']} | {m['end_vs_start_pct']:+.2f}% "
                      f"| {fmt(m['fds_base'])} → {fmt(m['fds_end'])} "
                      f"| {fmt(m.get('connections_base'))} → {fmt(m.get('connections_end'))} "
                      f"| {fmt(m.get('shards_base'))} → {fmt(m.get('shards_end'))} |")
        else:
            md.append(f"| node-{m['node']} | – | – | – | not measured | – | – | – | – | – |")
    md += ["", "| check | result | figures |", "|---|---|---|"]
    md += [f"| {n} | {'PASS' if ok else 'FAIL'} | {d} |" for n, ok, d in checks]
    md += ["", "![soak](soak.png)", ""]
    with open(os.path.join(a.dir, "summary.md"), "w") as f:
        f.write("\n".join(md))

    print(f"plot: {png}")
    print(f"summary: {os.path.join(a.dir, 'summary.json')}, {os.path.join(a.dir, 'summary.md')}")
    print(f"samples: {os.path.join(a.dir, 'samples.csv')}; segments: {os.path.join(a.dir, 'segments.jsonl')}")
    print(f"VERDICT {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
