# shellcheck shell=bash
# PostgreSQL: the primary and its streaming hot standby the nodes keep
# history in (up without --no-postgres).

# as_pg CMD...: runs CMD as the user Postgres runs as.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# pg_bin: the newest installed PostgreSQL's bin dir.
pg_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -x "$bin/postgres" ] || fm_die "PostgreSQL server binaries not found under /usr/lib/postgresql"
    echo "$bin"
}

# launch_pg NAME: starts pg-primary or pg-standby from its data dir (its
# port and listen address are in its postgresql.conf); prints its PID.
launch_pg() {
    local data="$DIR/$1"
    as_pg "$(pg_bin)/pg_ctl" -D "$data" -l "$DIR/$1.log" -w -t 60 start >/dev/null ||
        { tail -n 20 "$DIR/$1.log" >&2; return 1; }
    head -n 1 "$data/postmaster.pid"
}

# pg_url PORT DB: a connection string for the fluxmesh role.
pg_url() {
    echo "postgres://fluxmesh:$(cat "$DIR/pg-password")@127.0.0.1:$1/$2"
}

# up_postgres: primary (initdb once) and standby (pg_basebackup -R once),
# both started; sets PG_PRIMARY_URL and PG_STANDBY_URL.
up_postgres() {
    fm_apt postgresql
    local bin
    bin=$(pg_bin)
    [ -s "$DIR/pg-password" ] || { python3 -c 'import secrets; print(secrets.token_hex(16))' >"$DIR/pg-password"; }
    chmod 600 "$DIR/pg-password"
    # Postgres' own dirs and logs belong to the user it runs as.
    local f
    for f in pg-primary pg-standby; do
        [ -d "$DIR/$f" ] || install -d -m 700 "$DIR/$f"
        touch "$DIR/$f.log"
        [ "$(id -u)" -eq 0 ] && chown postgres "$DIR/$f" "$DIR/$f.log"
    done
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- test -x "$DIR" || fm_die "the postgres user cannot enter $DIR; move the checkout somewhere it can"
    fi
    local primary_port standby_port
    primary_port=$(pick_port 5433)
    standby_port=$(pick_port 5434)
    if ! [ -s "$DIR/pg-primary/PG_VERSION" ]; then
        fm_log "initdb pg-primary"
        local pwfile="$DIR/pg-primary.pw"
        cp "$DIR/pg-password" "$pwfile"
        [ "$(id -u)" -eq 0 ] && chown postgres "$pwfile"
        as_pg "$bin/initdb" -D "$DIR/pg-primary" -U fluxmesh --pwfile="$pwfile" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$DIR/pg-primary.log" 2>&1 ||
            { rm -f "$pwfile"; fail_up "initdb failed" "$DIR/pg-primary.log"; }
        rm -f "$pwfile"
    fi
    # Later lines win: this run's port.
    cat >>"$DIR/pg-primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $primary_port
unix_socket_directories = '$DIR/pg-primary'
wal_level = replica
max_wal_senders = 8
hot_standby = on
synchronous_commit = on
CONF
    local pid
    pid=$(launch_pg pg-primary) || fail_up "pg-primary did not start" "$DIR/pg-primary.log"
    echo "pg-primary $pid" >>"$PIDS"
    # The password reaches psql and pg_basebackup through a passfile (never a
    # command line, which any user can read).
    local pgpass="$DIR/pg.pgpass"
    echo "127.0.0.1:*:*:fluxmesh:$(cat "$DIR/pg-password")" >"$pgpass"
    chmod 600 "$pgpass"
    [ "$(id -u)" -eq 0 ] && chown postgres "$pgpass"
    if [ "$(as_pg env PGPASSFILE="$pgpass" "$bin/psql" -h 127.0.0.1 -p "$primary_port" -U fluxmesh -d postgres -Atc \
        "SELECT 1 FROM pg_database WHERE datname = 'fluxmesh'")" != 1 ]; then
        as_pg env PGPASSFILE="$pgpass" "$bin/psql" -q -h 127.0.0.1 -p "$primary_port" -U fluxmesh -d postgres \
            -c "CREATE DATABASE fluxmesh" || fm_die "cannot create database fluxmesh"
    fi
    if ! [ -s "$DIR/pg-standby/PG_VERSION" ]; then
        fm_log "pg_basebackup pg-standby"
        find "$DIR/pg-standby" -mindepth 1 -delete
        as_pg env PGPASSFILE="$pgpass" "$bin/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U fluxmesh \
            -D "$DIR/pg-standby" -R -X stream --checkpoint=fast >"$DIR/pg-standby.log" 2>&1 ||
            fail_up "pg_basebackup failed" "$DIR/pg-standby.log"
    fi
    # The standby streams from the primary's port of this run (the
    # primary_conninfo pg_basebackup -R wrote to postgresql.auto.conf would
    # win over postgresql.conf, and names the port of the first run).
    as_pg sed -i '/^primary_conninfo/d' "$DIR/pg-standby/postgresql.auto.conf"
    cat >>"$DIR/pg-standby/postgresql.conf" <<CONF
port = $standby_port
unix_socket_directories = '$DIR/pg-standby'
primary_conninfo = 'host=127.0.0.1 port=$primary_port user=fluxmesh passfile=$pgpass application_name=pg-standby'
CONF
    pid=$(launch_pg pg-standby) || fail_up "pg-standby did not start" "$DIR/pg-standby.log"
    echo "pg-standby $pid" >>"$PIDS"
    # Synchronous replication: a commit is on the standby too before the
    # nodes hear of it, so promoting the standby loses no row. Set with
    # ALTER SYSTEM, so that a promoted standby can drop it (it has no
    # standby of its own to wait for).
    as_pg "$bin/psql" -q -h "$DIR/pg-primary" -p "$primary_port" -U fluxmesh -d postgres \
        -v ON_ERROR_STOP=1 -c "ALTER SYSTEM SET synchronous_standby_names = '\"pg-standby\"'" -c "SELECT pg_reload_conf()" >/dev/null ||
        fm_die "cannot turn synchronous replication on"
    # Both servers, the writable one first found: the nodes follow a
    # promoted standby by themselves.
    # shellcheck disable=SC2034 # read by up_nodes (nodes.sh)
    PG_PRIMARY_URL="postgres://fluxmesh:$(cat "$DIR/pg-password")@127.0.0.1:$primary_port,127.0.0.1:$standby_port/fluxmesh?target_session_attrs=read-write"
    # shellcheck disable=SC2034
    PG_STANDBY_URL=$(pg_url "$standby_port" fluxmesh)
    fm_log "Postgres up: primary 127.0.0.1:$primary_port, standby 127.0.0.1:$standby_port"
}
