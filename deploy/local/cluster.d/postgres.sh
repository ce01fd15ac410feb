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

# pg_listen NAME: the addresses NAME's server listens on: 127.0.0.1, and
# with --netns the bridge too (the nodes come from their namespaces), which
# its pg_hba.conf then lets the fluxmesh role in from.
pg_listen() {
    if ! lab_on; then
        echo 127.0.0.1
        return
    fi
    local hba="host all fluxmesh $LAB_NET.0/24 scram-sha-256"
    as_pg grep -qxF "$hba" "$DIR/$1/pg_hba.conf" || echo "$hba" | as_pg tee -a "$DIR/$1/pg_hba.conf" >/dev/null
    echo "127.0.0.1,$(host_of host)"
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
    if [ -s "$DIR/pg-standby/PG_VERSION" ] && ! [ -f "$DIR/pg-standby/standby.signal" ]; then
        # Both would start as primaries, each with writes the other lacks.
        fm_die "pg-standby was promoted and Postgres not restored: run deploy/local/cluster pg-restore before down, or down --purge"
    fi
    # Later lines win: this run's port and addresses.
    cat >>"$DIR/pg-primary/postgresql.conf" <<CONF
listen_addresses = '$(pg_listen pg-primary)'
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
    # The standby streams from the primary's port of this run.
    pg_follow pg-standby "$standby_port" "$primary_port"
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

# pg_port NAME: the port NAME's server listens on (its config's last word).
pg_port() {
    awk -F' = ' '$1 == "port" { p = $2 } END { print p }' "$DIR/$1/postgresql.conf"
}

# pg_psql NAME SQL...: runs each SQL statement on NAME's server, over its
# socket, as the fluxmesh role; stops at the first error.
pg_psql() {
    local name=$1
    shift
    local args=() sql
    for sql in "$@"; do args+=(-c "$sql"); done
    as_pg "$(pg_bin)/psql" -qAt -v ON_ERROR_STOP=1 -h "$DIR/$name" -p "$(pg_port "$name")" -U fluxmesh -d postgres \
        "${args[@]}"
}

# pg_sync NAME STANDBY: NAME waits for STANDBY at each commit (synchronous
# replication); STANDBY empty: it waits for nobody.
pg_sync() {
    local names="''"
    [ -n "$2" ] && names="'\"$2\"'"
    pg_psql "$1" "ALTER SYSTEM SET synchronous_standby_names = $names" "SELECT pg_reload_conf()" >/dev/null
}

# pg_set_pid NAME PID: records NAME's new PID.
pg_set_pid() {
    sed -i "s/^$1 .*/$1 $2/" "$PIDS"
}

# pg_follow NAME PORT FROM_PORT: NAME's data dir, a pg_basebackup -R copy,
# becomes a standby on its own PORT and socket that streams from FROM_PORT
# as application NAME. The copy holds the source's port, socket lock files
# naming the source's PID, and its synchronous_standby_names; and the
# primary_conninfo pg_basebackup -R wrote to postgresql.auto.conf would win
# over postgresql.conf (and names the port of the run that made the copy).
pg_follow() {
    local name=$1 port=$2 from_port=$3
    find "$DIR/$name" -maxdepth 1 -name '.s.PGSQL.*' -delete
    as_pg sed -i '/^primary_conninfo/d; /^synchronous_standby_names/d' "$DIR/$name/postgresql.auto.conf"
    cat >>"$DIR/$name/postgresql.conf" <<CONF
listen_addresses = '$(pg_listen "$name")'
port = $port
unix_socket_directories = '$DIR/$name'
primary_conninfo = 'host=127.0.0.1 port=$from_port user=fluxmesh passfile=$DIR/pg.pgpass application_name=$name'
CONF
}

# pg_rebuild_standby NAME FROM: NAME (stopped) becomes a fresh streaming
# standby of FROM (pg_basebackup), on its own port, and is started.
pg_rebuild_standby() {
    local name=$1 from=$2 port from_port pid
    port=$(pg_port "$name")
    from_port=$(pg_port "$from")
    local pgpass="$DIR/pg.pgpass"
    find "$DIR/$name" -mindepth 1 -delete
    as_pg env PGPASSFILE="$pgpass" "$(pg_bin)/pg_basebackup" -h 127.0.0.1 -p "$from_port" -U fluxmesh \
        -D "$DIR/$name" -R -X stream --checkpoint=fast >>"$DIR/$name.log" 2>&1 ||
        fm_die "pg_basebackup of $name from $from failed; log: $DIR/$name.log"
    pg_follow "$name" "$port" "$from_port"
    pid=$(launch_pg "$name") || fm_die "$name did not start as a standby; log: $DIR/$name.log"
    pg_set_pid "$name" "$pid"
    fm_log "$name is a standby of $from ($pid)"
}

# pg_wait_sync NAME STANDBY: until NAME sees STANDBY replicating
# synchronously (30 s).
pg_wait_sync() {
    local _
    for _ in $(seq 1 300); do
        [ "$(pg_psql "$1" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$2'")" = sync ] &&
            return 0
        sleep 0.1
    done
    fm_die "$2 is not replicating synchronously from $1"
}

# cmd_pg_promote: the primary is gone; promote the standby and let it
# commit without a standby of its own (until pg-restore gives it one).
cmd_pg_promote() {
    [ -s "$PIDS" ] || fm_die "the cluster is not up"
    local pid
    pid=$(awk '$1 == "pg-primary" {print $2}' "$PIDS")
    [ -n "$pid" ] || fm_die "this cluster has no Postgres"
    ! alive "$pid" || fm_die "pg-primary ($pid) is still running: stop it first (two primaries must never run)"
    as_pg "$(pg_bin)/pg_ctl" promote -w -t 60 -D "$DIR/pg-standby" >/dev/null ||
        fm_die "pg_ctl promote failed; log: $DIR/pg-standby.log"
    pg_sync pg-standby ""
    fm_log "pg-standby promoted; it commits without a standby until pg-restore"
}

# cmd_pg_restore: after pg-promote, back to pg-primary as the primary and
# pg-standby as its synchronous standby: pg-primary is rebuilt as a standby
# of the promoted server, which is then shut down cleanly (its last WAL
# reaches pg-primary) so that pg-primary can be promoted, and pg-standby is
# rebuilt from it.
cmd_pg_restore() {
    [ -s "$PIDS" ] || fm_die "the cluster is not up"
    local pid
    pid=$(awk '$1 == "pg-primary" {print $2}' "$PIDS")
    ! alive "$pid" || fm_die "pg-primary ($pid) is running: nothing to restore"
    [ -f "$DIR/pg-standby/standby.signal" ] && fm_die "pg-standby was not promoted: run pg-promote first"
    pg_rebuild_standby pg-primary pg-standby
    pg_sync pg-standby pg-primary
    pg_wait_sync pg-standby pg-primary
    as_pg "$(pg_bin)/pg_ctl" stop -w -t 60 -m fast -D "$DIR/pg-standby" >/dev/null ||
        fm_die "clean shutdown of pg-standby failed"
    as_pg "$(pg_bin)/pg_ctl" promote -w -t 60 -D "$DIR/pg-primary" >/dev/null ||
        fm_die "pg_ctl promote of pg-primary failed; log: $DIR/pg-primary.log"
    pg_sync pg-primary ""
    pg_rebuild_standby pg-standby pg-primary
    pg_sync pg-primary pg-standby
    pg_wait_sync pg-primary pg-standby
    fm_log "Postgres restored: pg-primary the primary, pg-standby its synchronous standby"
}
