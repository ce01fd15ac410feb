#!/usr/bin/env python3
"""Waits until the local cluster has caught up: every node's /metrics
answers, the consumer lag summed over them (fluxmesh_shard_lag_messages)
is at most --lag-ok messages and the history writer queue summed over them
(fluxmesh_pg_writer_queue) at most --queue-ok batches. Polls every second
until --timeout. Prints one JSON object (ok, waited_ms, consumer_lag,
pg_writer_queue, nodes_answered, nodes, per_node) and exits 0 if caught
up, 1 if not.

    drain.py --cluster-dir DIR [--timeout 120] [--lag-ok 10] [--queue-ok 1]
"""
import argparse
import json
import os
import sys
import time

# No __pycache__ left in the checkout.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soaklib as sl  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster-dir", required=True)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--lag-ok", type=float, default=10)
    ap.add_argument("--queue-ok", type=float, default=1)
    a = ap.parse_args()
    started = time.time()
    deadline = started + a.timeout
    http = sl.node_http(sl.read_env(os.path.join(a.cluster_dir, "endpoints.env")))
    while True:
        lag, queue, answered, per = sl.lag_now(http)
        ok = answered == len(http) and lag <= a.lag_ok and queue <= a.queue_ok
        if ok or time.time() >= deadline:
            break
        time.sleep(1)
    print(json.dumps({
        "ok": ok,
        "waited_ms": int((time.time() - started) * 1000),
        "consumer_lag": lag,
        "pg_writer_queue": queue,
        "nodes_answered": answered,
        "nodes": len(http),
        "per_node": {i: {"consumer_lag": l, "pg_writer_queue": q} for i, (l, q) in per.items()},
        "lag_ok": a.lag_ok,
        "queue_ok": a.queue_ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
