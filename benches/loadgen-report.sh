# shellcheck shell=bash
# Reading the load generator's JSON report (fluxmesh-loadgen --report json:
# one object on stdout; field names in benches/src/loadgen/report.rs and
# the README). Sourced by the benches and chaos/lib.sh.

# loadgen_field FIELD: one field of the report on stdin, FIELD a dotted
# path (mesh.acked_rate, verify.acked_but_missing); fractional numbers
# rounded to whole ones, as the text report prints rates; true/false for
# booleans; empty if the field is null or absent or stdin is not a report.
loadgen_field() {
    python3 -c 'import json, sys
try:
    v = json.load(sys.stdin)
except ValueError:
    v = None
for key in sys.argv[1].split("."):
    v = v.get(key) if isinstance(v, dict) else None
if isinstance(v, bool):
    v = json.dumps(v)
elif isinstance(v, float):
    v = f"{v:.0f}"
print("" if v is None else v)' "$1"
}
