#!/usr/bin/env python3
"""benches/soak's sampler: every --interval seconds, one row per sample
(JSON lines to --out, a flat CSV beside it) with, per node of the local
cluster:
  - its PID (from the cluster's pids file: a node started again after a
    kill has a new one), process state, RSS (VmRSS, KiB), open files
    (entries of /proc/PID/fd);
  - from its /metrics (plain HTTP, no token): consumer lag
    (fluxmesh_shard_lag_messages), history writer queue
    (fluxmesh_pg_writer_queue), and over the interval since the previous
    sample the PUBACK latency (fluxmesh_ingest_seconds: MQTT receipt to
    JetStream ack, which the PUBACK follows) and the history writer's lag
    (fluxmesh_pg_write_lag_seconds: rows handed over to committed), p50
    and p99 from the histograms' buckets; counters for the pipeline
    (ingested, processed, aggregated, rule runs and errors, history rows,
    derived frames by kind);
and for the cluster: the sums, and the percentiles over every node's
buckets together. Each row also carries the phase benches/soak is in
(--phase file: "SEGMENT KIND PHASE").

Stops at --until (Unix time), on SIGTERM, or when --stop-file appears:
then it takes one last sample first (phase as the file says).

    sampler.py --cluster-dir DIR --out samples.jsonl --phase FILE --until T [--interval 60]
"""
import argparse
import csv
import json
import os
import signal
import sys
import time

# No __pycache__ left in the checkout.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soaklib as sl  # noqa: E402

stopping = False


def on_term(_signum, _frame):
    global stopping
    stopping = True


def read_phase(path):
    try:
        with open(path) as f:
            parts = f.read().split()
    except OSError:
        parts = []
    seg = int(parts[0]) if parts and parts[0].isdigit() else 0
    kind = parts[1] if len(parts) > 1 else "-"
    phase = parts[2] if len(parts) > 2 else "setup"
    return seg, kind, phase


class Sampler:
    def __init__(self, cluster_dir, phase_file, t0):
        self.cluster_dir = cluster_dir
        self.phase_file = phase_file
        self.t0 = t0
        env = sl.read_env(os.path.join(cluster_dir, "endpoints.env"))
        self.http = sl.node_http(env)
        self.ids = list(self.http)
        # (node, pid) -> cumulative buckets at the previous sample.
        self.prev = {}
        # PIDs seen at the first sample: their histograms hold what came
        # before the soak, so their first interval is unknown. A PID first
        # seen later started since: everything it counted is new.
        self.first_pids = None
        # (node, pid) scraped at an earlier sample.
        self.scraped = set()

    def interval(self, key, hist, now_buckets):
        """The buckets observed since the previous sample of this node
        process; [] when unknown."""
        if not now_buckets:
            return []
        before = self.prev.get((key, hist))
        self.prev[(key, hist)] = now_buckets
        if before is None:
            # New since the soak began: a process started since, or one
            # scraped before that had not observed anything yet.
            fresh = key in self.scraped or (self.first_pids is not None and key[1] not in self.first_pids)
            return now_buckets if fresh else []
        return sl.bucket_delta(now_buckets, before) or []

    def sample(self):
        t = time.time()
        seg, kind, phase = read_phase(self.phase_file)
        pids = sl.read_pids(self.cluster_dir)
        row = {"t": round(t, 3), "elapsed_s": round(t - self.t0, 1), "segment": seg, "kind": kind,
               "phase": phase, "nodes": {}}
        ingest_all, pglag_all = [], []
        lag_sum = queue_sum = 0.0
        answered = 0
        counters_sum = {}
        for i in self.ids:
            pid = pids.get(f"node-{i}")
            node = {"pid": pid, "state": None, "rss_kib": None, "fds": None, "scraped": False,
                    "shard_lag": None, "pg_writer_queue": None, "rules_active": None}
            if pid:
                node["state"] = sl.proc_state(pid)
                if node["state"] not in (None, "Z"):
                    node["rss_kib"] = sl.proc_rss_kib(pid)
                    node["fds"] = sl.proc_fds(pid)
            # A paused node (state T) would only time out.
            text = sl.scrape(self.http[i]) if node["state"] not in (None, "Z", "T") else None
            if text is not None:
                p = sl.parse(text)
                node["scraped"] = True
                answered += 1
                node["shard_lag"] = sl.total(p, sl.SHARD_LAG) or 0.0
                node["pg_writer_queue"] = sl.total(p, sl.PG_WRITER_QUEUE) or 0.0
                node["rules_active"] = sl.total(p, sl.RULES_ACTIVE)
                node["connections"] = sl.total(p, sl.MQTT_CONNECTIONS)
                node["shards"] = sl.total(p, sl.SHARDS_RUNNING)
                lag_sum += node["shard_lag"]
                queue_sum += node["pg_writer_queue"]
                counters = {k: sl.total(p, name) for k, name in sl.COUNTERS.items()}
                counters["rule_runs"] = sl.total(p, sl.RULES_SECONDS + "_count")
                for kd in sl.DERIVED_KINDS:
                    counters[f"derived_{kd}"] = sl.total(p, sl.DERIVED, kind=kd)
                node["counters"] = counters
                for k, v in counters.items():
                    if v is not None:
                        counters_sum[k] = counters_sum.get(k, 0.0) + v
                key = (i, pid)
                ingest = self.interval(key, "ingest", sl.buckets(p, sl.INGEST_SECONDS))
                pglag = self.interval(key, "pglag", sl.buckets(p, sl.PG_WRITE_LAG_SECONDS))
                ingest_all.append(ingest)
                pglag_all.append(pglag)
                self.scraped.add(key)
                node["puback_p50_ms"] = sl.ms(sl.quantile(ingest, 0.5))
                node["puback_p99_ms"] = sl.ms(sl.quantile(ingest, 0.99))
                node["interval_acks"] = ingest[-1][1] if ingest else None
            row["nodes"][i] = node
        if self.first_pids is None:
            self.first_pids = {pids.get(f"node-{i}") for i in self.ids}
        ingest = sl.bucket_sum(ingest_all)
        pglag = sl.bucket_sum(pglag_all)
        row["cluster"] = {
            "nodes_scraped": answered,
            "consumer_lag": lag_sum if answered else None,
            "pg_writer_queue": queue_sum if answered else None,
            "puback_p50_ms": sl.ms(sl.quantile(ingest, 0.5)),
            "puback_p99_ms": sl.ms(sl.quantile(ingest, 0.99)),
            "interval_acks": ingest[-1][1] if ingest else None,
            "pg_write_lag_p50_ms": sl.ms(sl.quantile(pglag, 0.5)),
            "pg_write_lag_p99_ms": sl.ms(sl.quantile(pglag, 0.99)),
            "counters": counters_sum,
        }
        return row


def csv_row(ids, row):
    c = row["cluster"]
    out = [row["t"], row["elapsed_s"], row["segment"], row["kind"], row["phase"], c["consumer_lag"],
           c["pg_writer_queue"], c["puback_p50_ms"], c["puback_p99_ms"], c["pg_write_lag_p50_ms"],
           c["pg_write_lag_p99_ms"]]
    for i in ids:
        n = row["nodes"].get(i, {})
        out += [n.get("pid"), n.get("state"), n.get("rss_kib"), n.get("fds"), n.get("shard_lag"),
                n.get("pg_writer_queue"), n.get("puback_p99_ms")]
    return ["" if v is None else v for v in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster-dir", required=True)
    ap.add_argument("--out", required=True, help="JSON lines; the CSV goes beside it (.csv)")
    ap.add_argument("--phase", required=True)
    ap.add_argument("--until", type=float, required=True)
    ap.add_argument("--interval", type=float, default=60.0)
    ap.add_argument("--stop-file", default=None)
    ap.add_argument("--t0", type=float, default=None)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    t0 = a.t0 if a.t0 is not None else time.time()
    s = Sampler(a.cluster_dir, a.phase, t0)
    csv_path = os.path.splitext(a.out)[0] + ".csv"
    new_csv = not os.path.exists(csv_path)
    with open(a.out, "a") as jf, open(csv_path, "a", newline="") as cf:
        w = csv.writer(cf)
        if new_csv:
            head = ["t", "elapsed_s", "segment", "kind", "phase", "consumer_lag", "pg_writer_queue",
                    "puback_p50_ms", "puback_p99_ms", "pg_write_lag_p50_ms", "pg_write_lag_p99_ms"]
            for i in s.ids:
                head += [f"node{i}_{k}" for k in ("pid", "state", "rss_kib", "fds", "lag", "pg_queue",
                                                   "puback_p99_ms")]
            w.writerow(head)

        def write(row):
            jf.write(json.dumps(row, separators=(",", ":")) + "\n")
            jf.flush()
            w.writerow(csv_row(s.ids, row))
            cf.flush()

        next_at = time.time()
        while not stopping:
            now = time.time()
            if a.stop_file and os.path.exists(a.stop_file):
                write(s.sample())
                break
            if now >= a.until:
                break
            if now >= next_at:
                write(s.sample())
                while next_at <= time.time():
                    next_at += a.interval
                continue
            time.sleep(max(0.05, min(1.0, next_at - now)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
