#!/usr/bin/env python3
"""Waits until every given node's view of the cluster has settled.

Settled: the node sees exactly --live live nodes, and every shard has a
valid lease held by its desired owner. Polls GET /api/v1/cluster?lag=false
every 20 ms, with the admin token from $FLUXMESH_ADMIN_TOKEN (else from
.local/cluster/endpoints.env). Prints the milliseconds it took (from
--since, a Unix time in seconds, default now) and exits 0; exits 1 after
--timeout seconds, 2 at once if the token is refused.

    settle.py --live 2 --since 1700000000.123 127.0.0.1:8080 127.0.0.1:8082
"""
import argparse
import json
import os
import pathlib
import sys
import time
import urllib.error
import urllib.request


def admin_token() -> str:
    token = os.environ.get("FLUXMESH_ADMIN_TOKEN", "")
    if token:
        return token
    endpoints = pathlib.Path(__file__).resolve().parent.parent / ".local" / "cluster" / "endpoints.env"
    try:
        for line in endpoints.read_text().splitlines():
            if line.startswith("FLUXMESH_ADMIN_TOKEN="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return ""


def settled(node: str, live: int, token: str) -> bool:
    request = urllib.request.Request(
        f"http://{node}/api/v1/cluster?lag=false", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as r:
            view = json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            print(f"{node}: the admin token was refused (401); is FLUXMESH_ADMIN_TOKEN this cluster's?", file=sys.stderr)
            sys.exit(2)
        return False
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
    token = admin_token()
    since = a.since if a.since is not None else time.time()
    deadline = time.time() + a.timeout
    while time.time() < deadline:
        if all(settled(n, a.live, token) for n in a.nodes):
            print(int((time.time() - since) * 1000))
            return 0
        time.sleep(0.02)
    print(f"not settled within {a.timeout} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
