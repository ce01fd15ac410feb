#!/usr/bin/env python3
"""Installs benches/soak's rules through the admin API of the first node
(PUT /api/v1/rules/{id}, the bearer token from $FLUXMESH_ADMIN_TOKEN, never
a command line), then waits until every node runs every enabled stored
rule (fluxmesh_rules_active on its /metrics, against GET /api/v1/rules).

Both rules match every device (device glob `*`: the chaos scripts give
each run's devices a fresh prefix) on the load generator's channel,
`load`:
  soak-count: every message, binary or JSON: an `event` frame on each
              device's 1000th, 2000th, ... message (from its state's count);
  soak-hot:   JSON messages (the load generator's --json payloads carry a
              number `t`, 0.5 ... 59.5): an `info` alert when t > 58.9, once
              per 60 messages of a device.
Aggregation needs no API: the nodes aggregate every numeric field of JSON
payloads in one-minute windows by default (aggregation.windows_ms).

    rules.py --cluster-dir DIR [--timeout 30]
Prints the rule ids and the count every node runs.
"""
import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

# No __pycache__ left in the checkout.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soaklib as sl  # noqa: E402

RULES = {
    "soak-count": {
        "device": "*",
        "channel": "load",
        "description": "benches/soak: an event every 1000 messages of a device",
        "script": "if state.count % 1000 == 999 { emit(#{ soak_messages: state.count + 1 }); }",
    },
    "soak-hot": {
        "device": "*",
        "channel": "load",
        "description": "benches/soak: an info alert when a JSON reading's t is above 58.9",
        "script": (
            'if is_json && type_of(payload) == "map" && "t" in payload && payload.t > 58.9 '
            '{ alert("info", "soak: t above 58.9", #{ t: payload.t }); }'
        ),
    },
}


def request(url, token, method="GET", body=None):
    headers = {"Authorization": "Bearer " + token}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster-dir", required=True)
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()
    token = os.environ.get("FLUXMESH_ADMIN_TOKEN", "")
    if not token:
        sys.exit("rules.py: FLUXMESH_ADMIN_TOKEN is not set")
    http = sl.node_http(sl.read_env(os.path.join(a.cluster_dir, "endpoints.env")))
    if not http:
        sys.exit("rules.py: no node in endpoints.env")
    first = next(iter(http.values()))
    for rule_id, body in RULES.items():
        url = f"http://{first}/api/v1/rules/{rule_id}"
        try:
            request(url, token, "PUT", body)
        except urllib.error.HTTPError as e:
            sys.exit(f"PUT {url}: {e.code} {e.read().decode(errors='replace')[:300]}")
        except OSError as e:
            sys.exit(f"PUT {url}: {e}")
    stored = request(f"http://{first}/api/v1/rules", token)["rules"]
    ids = {r.get("id") for r in stored}
    missing = set(RULES) - ids
    if missing:
        sys.exit(f"rules.py: {sorted(missing)} not listed after PUT")
    want = sum(1 for r in stored if r.get("enabled", True))
    deadline = time.time() + a.timeout
    while True:
        active = {}
        for i, h in http.items():
            text = sl.scrape(h)
            active[i] = sl.total(sl.parse(text), sl.RULES_ACTIVE) if text else None
        if all(v is not None and v >= want for v in active.values()):
            break
        if time.time() >= deadline:
            sys.exit(f"rules.py: not every node runs the {want} enabled rules within {a.timeout:.0f} s "
                     f"(fluxmesh_rules_active per node: {active})")
        time.sleep(0.5)
    print(f"rules: {', '.join(sorted(RULES))} installed; every node runs {want} enabled rules "
          f"(the rest seeded from configs/rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
