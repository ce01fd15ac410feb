"""What benches/soak's helpers share (standard library only): the local
cluster's endpoints and PIDs, /proc figures of a process, and a node's
/metrics (Prometheus text) read into sums, gauges and histograms.

The metric names are the node's (node/src/internal_events/names.rs and
mesh/src/metric_names.rs); every one is listed in README.md.
"""
import os
import re
import time
import urllib.request

# Gauges.
SHARD_LAG = "fluxmesh_shard_lag_messages"        # stored, not yet processed (shards this node runs)
PG_WRITER_QUEUE = "fluxmesh_pg_writer_queue"     # batches queued for the history writer
RULES_ACTIVE = "fluxmesh_rules_active"
MQTT_CONNECTIONS = "fluxmesh_mqtt_connections"  # what a node holds, beside its RSS
SHARDS_RUNNING = "fluxmesh_shards_running"
# Histograms (seconds; buckets set in node/src/internal_events/mod.rs).
INGEST_SECONDS = "fluxmesh_ingest_seconds"       # MQTT receipt -> JetStream ack, after which the PUBACK goes
PG_WRITE_LAG_SECONDS = "fluxmesh_pg_write_lag_seconds"  # rows handed to the writer -> committed
RULES_SECONDS = "fluxmesh_rules_seconds"         # one observation per message some rule matched
# Counters.
COUNTERS = {
    "ingested": "fluxmesh_ingest_messages_total",
    "processed": "fluxmesh_shard_messages_total",
    "agg_updates": "fluxmesh_agg_updates_total",
    "rule_errors": "fluxmesh_rule_errors_total",
    "pg_rows_written": "fluxmesh_pg_rows_written_total",
    "pg_write_errors": "fluxmesh_pg_write_errors_total",
}
# fluxmesh_derived_frames_total by kind.
DERIVED = "fluxmesh_derived_frames_total"
DERIVED_KINDS = ("state", "event", "alert", "agg", "error")

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def read_env(path):
    """KEY=VALUE lines of an env file (quotes stripped)."""
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                values[k.removeprefix("export ")] = v.strip("'\"")
    return values


def node_ids(env):
    """The node numbers of endpoints.env (FLUXMESH_NODE_IDS, else 1..N)."""
    ids = env.get("FLUXMESH_NODE_IDS", "").replace(",", " ").split()
    if ids:
        return ids
    return [str(i) for i in range(1, int(env.get("FLUXMESH_NODES", "0")) + 1)]


def node_http(env):
    """{node number: host:port of its HTTP listener}."""
    return {i: env[f"FLUXMESH_NODE{i}_HTTP"] for i in node_ids(env) if env.get(f"FLUXMESH_NODE{i}_HTTP")}


def read_pids(cluster_dir):
    """{member name: PID} from the cluster's pids file (node-i, nats-i,
    pg-primary, pg-standby); the cluster script rewrites a line when it
    starts a member again."""
    pids = {}
    try:
        with open(os.path.join(cluster_dir, "pids")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    pids[parts[0]] = int(parts[1])
    except OSError:
        pass
    return pids


def proc_state(pid):
    """The process's state letter (R, S, T, Z, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def scrape(http, timeout=3.0):
    """A node's /metrics text, or None (down, paused, not answering)."""
    try:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=timeout) as r:
            return r.read().decode("utf-8", "replace")
    except Exception:
        return None


def parse(text):
    """{metric name: [(labels dict, value), ...]} from Prometheus text."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            close = line.rfind("}")
            labels = dict(_LABEL.findall(line[brace + 1:close]))
            rest = line[close + 1:].split()
        else:
            name, _, tail = line.partition(" ")
            labels = {}
            rest = tail.split()
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        out.setdefault(name, []).append((labels, value))
    return out


def total(parsed, name, **match):
    """The sum of every series of `name` whose labels include `match`;
    None if the node exports no such series."""
    series = [v for labels, v in parsed.get(name, []) if all(labels.get(k) == w for k, w in match.items())]
    return sum(series) if series else None


def buckets(parsed, name):
    """A histogram's cumulative buckets summed over its other labels:
    [(upper bound, count), ...] ascending, +Inf last; [] if absent."""
    acc = {}
    for labels, v in parsed.get(name + "_bucket", []):
        le = labels.get("le")
        if le is None:
            continue
        bound = float("inf") if le in ("+Inf", "Inf") else float(le)
        acc[bound] = acc.get(bound, 0.0) + v
    return sorted(acc.items())


def bucket_delta(now, before):
    """now - before, bound by bound; None if they do not line up or a
    count went down (the process restarted: use `now` alone)."""
    if before is None or [b for b, _ in now] != [b for b, _ in before]:
        return None
    delta = [(b, c - p) for (b, c), (_, p) in zip(now, before)]
    if any(c < 0 for _, c in delta):
        return None
    return delta


def bucket_sum(many):
    """Several bucket lists with the same bounds, added bound by bound."""
    many = [m for m in many if m]
    if not many:
        return []
    bounds = [b for b, _ in many[0]]
    if any([b for b, _ in m] != bounds for m in many):
        return []
    return [(b, sum(m[i][1] for m in many)) for i, b in enumerate(bounds)]


def quantile(cumulative, q):
    """The q-quantile of a cumulative histogram, interpolated linearly
    inside its bucket (as Prometheus' histogram_quantile does); the top
    finite bound if it falls in +Inf; None without observations."""
    if not cumulative:
        return None
    count = cumulative[-1][1]
    if count <= 0:
        return None
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, c in cumulative:
        if c >= rank:
            if bound == float("inf"):
                return lower_bound
            if c == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (c - lower_count)
        lower_bound, lower_count = bound, c
    return lower_bound


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def lag_now(http_by_node, timeout=2.0):
    """(consumer lag summed over the nodes, writer queue summed, nodes that
    answered, {node: (lag, queue)})."""
    lag = queue = 0.0
    answered = 0
    per = {}
    for i, http in http_by_node.items():
        text = scrape(http, timeout)
        if text is None:
            per[i] = (None, None)
            continue
        p = parse(text)
        node_lag = total(p, SHARD_LAG) or 0.0
        node_queue = total(p, PG_WRITER_QUEUE) or 0.0
        per[i] = (node_lag, node_queue)
        lag += node_lag
        queue += node_queue
        answered += 1
    return lag, queue, answered, per


def now():
    return time.time()
