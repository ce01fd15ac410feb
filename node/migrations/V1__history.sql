-- fluxmesh history (DESIGN §6). Applied once per cluster, under an advisory
-- lock, by the first node that starts with storage on.
--
-- Every table is keyed by (device, received_at, frame_id), so writing the
-- same frame twice stores it once: received_at comes from the frame itself
-- (a replay carries the same value), and an aggregate's frame id names its
-- window. Every table is partitioned by day (UTC) of received_at, the
-- mesh's own clock (never a device's, so no device clock can make
-- partitions); nodes create partitions ahead and drop those past retention.

CREATE TABLE telemetry (
    device      text        NOT NULL,
    received_at timestamptz NOT NULL,
    frame_id    uuid        NOT NULL,
    channel     text        NOT NULL,
    device_time timestamptz,
    origin      text        NOT NULL,
    -- The payload as JSON when it is JSON Postgres accepts, else the bytes.
    json        jsonb,
    raw         bytea,
    PRIMARY KEY (device, received_at, frame_id)
) PARTITION BY RANGE (received_at);

-- Derived frames other than aggregates: state, alert, event, error.
CREATE TABLE events (
    device      text        NOT NULL,
    received_at timestamptz NOT NULL,
    frame_id    uuid        NOT NULL,
    kind        text        NOT NULL,
    channel     text        NOT NULL,
    producer    text        NOT NULL,
    seq         bigint      NOT NULL,
    device_time timestamptz,
    origin      text        NOT NULL,
    severity    text,
    message     text,
    json        jsonb,
    raw         bytea,
    PRIMARY KEY (device, received_at, frame_id)
) PARTITION BY RANGE (received_at);

CREATE INDEX events_kind ON events (device, kind, received_at);

-- Closed windows; received_at is when the mesh received the message that
-- closed the window.
CREATE TABLE aggregates (
    device       text        NOT NULL,
    received_at  timestamptz NOT NULL,
    frame_id     uuid        NOT NULL,
    channel      text        NOT NULL,
    field        text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    count        bigint      NOT NULL,
    sum          float8      NOT NULL,
    min          float8      NOT NULL,
    max          float8      NOT NULL,
    mean         float8      NOT NULL,
    variance     float8      NOT NULL,
    origin       text        NOT NULL,
    PRIMARY KEY (device, received_at, frame_id)
) PARTITION BY RANGE (received_at);

CREATE INDEX aggregates_window ON aggregates (device, window_start);

CREATE VIEW alerts AS
    SELECT device, received_at, frame_id, channel, producer, seq, severity, message, json
    FROM events WHERE kind = 'alert';
