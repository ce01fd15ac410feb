#!/usr/bin/env python3
"""Waits until every given node's view of the cluster has settled.

Settled: the node sees exactly --live live nodes, and every shard has a
valid lease held by its desired owner. Polls GET /api/v1/cluster?lag=false
every 20 ms. Prints the milliseconds it took (from --since, a Unix time in
seconds, default now) and exits 0; exits 1 after --timeout seconds.

    settle.py --live 2 --since 1700000000.123 127.0.0.1:8080 127.0.0.1:8082
"""
import argparse
import json
import sys
import time
import urllib.request


def settled(node: str, live: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{node}/api/v1/cluster?lag=false", timeout=1) as r:
            view = json.load(r)
    except Exception:
        return False
    shards = view.get("shards", [])
    return len(view.get("nodes", [])) == live and bool(shards) and all(
        s.get("lease_valid") and s.get("holder") == s.get("desired_owner") for s in shards
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--live", type=int, required=True)
    p.add_argument("--since", type=float, default=None)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("nodes", nargs="+")
    a = p.parse_args()
    since = a.since if a.since is not None else time.time()
    deadline = time.time() + a.timeout
    while time.time() < deadline:
        if all(settled(n, a.live) for n in a.nodes):
            print(int((time.time() - since) * 1000))
            return 0
        time.sleep(0.02)
    print(f"not settled within {a.timeout} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
