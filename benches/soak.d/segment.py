#!/usr/bin/env python3
"""Records one benches/soak segment: one chaos script run (its output,
each line stamped with the Unix time it was printed, and its exit status),
the JSON load that ran beside it (the load generator's JSON report and
exit status), and the drain after it (drain.py's JSON). Appends one JSON
line to --segments and prints a one-line summary.

From the chaos output: the run's device prefix (`(prefix P)`), whose
report the script left in --chaos-dir as P.out (copied next to the log);
the time the fault was injected (the first `   SIGKILL` / `   SIGSTOP`
line); the RESULT line's fields; violations.
"""
import argparse
import json
import os
import re
import shutil
import sys

FIELDS = {
    "sent": ("mesh", "sent"),
    "acked": ("verify", "acked"),
    "stored": ("verify", "stored"),
    "lost": ("verify", "acked_but_missing"),
    "stored_twice": ("verify", "stored_twice"),
    "applied_behind": ("verify_processing", "applied_behind"),
    "applied_twice": ("verify_processing", "applied_twice"),
    "duplicate_state_frames": ("verify_processing", "duplicate_state_frames"),
    "missing_state_frames": ("verify_processing", "missing_state_frames"),
    "acked_rate": ("mesh", "acked_rate"),
    "reconnects": ("mesh", "reconnects"),
    "max_puback_gap_ms": ("mesh", "puback_gap", "max_ms"),
}
VIOLATIONS = ("lost", "applied_behind", "applied_twice", "duplicate_state_frames", "missing_state_frames")


def report_figures(path):
    """The figures of a load generator JSON report; {} if unreadable."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for name, keys in FIELDS.items():
        v = report
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        out[name] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--dir", required=True, help="the segment's folder (chaos.log, json-load.out, drain.json)")
    ap.add_argument("--rc", type=int, required=True)
    ap.add_argument("--side-rc", type=int, required=True)
    ap.add_argument("--started", type=float, required=True)
    ap.add_argument("--load-ended", type=float, required=True)
    ap.add_argument("--ended", type=float, required=True)
    ap.add_argument("--duration", type=int, required=True)
    ap.add_argument("--chaos-rate", type=int, required=True)
    ap.add_argument("--json-rate", type=int, required=True)
    ap.add_argument("--settle-ms", default="")
    ap.add_argument("--chaos-dir", required=True)
    ap.add_argument("--segments", required=True)
    a = ap.parse_args()

    lines = []
    try:
        with open(os.path.join(a.dir, "chaos.log"), errors="replace") as f:
            for raw in f:
                stamp, _, text = raw.rstrip("\n").partition(" ")
                try:
                    lines.append((float(stamp.replace(",", ".")), text))
                except ValueError:
                    lines.append((None, raw.rstrip("\n")))
    except OSError:
        pass

    prefix = fault_at = fault_line = None
    result = {}
    violations = []
    for t, text in lines:
        m = re.search(r"\(prefix ([A-Za-z0-9_.-]+)\)", text)
        if m and prefix is None:
            prefix = m.group(1)
        if fault_at is None and re.match(r"^   (SIGKILL|SIGSTOP)", text):
            fault_at, fault_line = t, text.strip()
        if text.startswith("RESULT "):
            result = dict(f.split("=", 1) for f in text.split()[1:] if "=" in f)
        if text.startswith("   violation:"):
            violations.append(text.strip())

    chaos = {}
    if prefix:
        src = os.path.join(a.chaos_dir, prefix + ".out")
        for suffix in ("", ".progress"):
            try:
                shutil.copyfile(src + suffix, os.path.join(a.dir, "chaos.out" + suffix))
            except OSError:
                pass
        chaos = report_figures(src)
    side = report_figures(os.path.join(a.dir, "json-load.out"))

    chaos_verdict = result.get("verdict", "ERROR")
    if a.rc != 0 and chaos_verdict == "PASS":
        chaos_verdict = "FAIL"
    if a.rc == 0 and not result:
        chaos_verdict = "ERROR"
    side_bad = [k for k in VIOLATIONS if side.get(k) not in (0, None)]
    side_ok = a.side_rc == 0 and bool(side) and side.get("lost") is not None and not side_bad
    try:
        with open(os.path.join(a.dir, "drain.json")) as f:
            drain = json.load(f)
    except (OSError, ValueError):
        drain = {"ok": False, "error": "drain.py gave no answer"}

    def num(v):
        try:
            return int(v)
        except (TypeError, ValueError):
            return v

    record = {
        "index": a.index,
        "kind": a.kind,
        "started": a.started,
        "load_ended": a.load_ended,
        "ended": a.ended,
        "duration_s": a.duration,
        "chaos_rate": a.chaos_rate,
        "json_rate": a.json_rate,
        "settle_ms": num(a.settle_ms) if a.settle_ms else None,
        "prefix": prefix,
        "fault_at": fault_at,
        "fault": fault_line,
        "rc": a.rc,
        "verdict": chaos_verdict,
        "failover_ms": num(result.get("failover_ms")),
        "recovery_ms": num(result.get("recovery_ms")),
        "violations": violations,
        "chaos": chaos,
        "json_load": {"rc": a.side_rc, "ok": side_ok, "violations": side_bad, **side},
        "drain": drain,
    }
    with open(a.segments, "a") as f:
        f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def g(d, k):
        v = d.get(k)
        return "?" if v is None else v

    print(f"   segment {a.index} {a.kind}: {chaos_verdict} (exit {a.rc}) "
          f"{fault_line or 'no fault line'}; failover_ms={g(result, 'failover_ms')} "
          f"recovery_ms={g(result, 'recovery_ms')}; chaos load acked={g(chaos, 'acked')} "
          f"lost={g(chaos, 'lost')} applied_twice={g(chaos, 'applied_twice')}; JSON load "
          f"{'ok' if side_ok else 'NOT ok'} acked={g(side, 'acked')} lost={g(side, 'lost')} "
          f"applied_twice={g(side, 'applied_twice')}; drained "
          f"{'in ' + str(drain.get('waited_ms')) + ' ms' if drain.get('ok') else 'NOT within the deadline'} "
          f"(lag {drain.get('consumer_lag', '?')}, writer queue {drain.get('pg_writer_queue', '?')})")
    for v in violations:
        print(f"     {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
