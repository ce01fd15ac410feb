# shellcheck shell=bash
# The local CA and server certificate of --secure (openssl).

# make_certs: a local CA and one server certificate (SAN 127.0.0.1 and
# localhost; server and client use, as NATS routes need both) in $DIR/tls;
# made once, again only when missing or expiring within a day.
make_certs() {
    local tls="$TLS_DIR"
    install -d -m 700 "$tls"
    if [ -s "$tls/ca.pem" ] && [ -s "$tls/server.pem" ] && [ -s "$tls/server.key" ] &&
        openssl x509 -checkend 86400 -noout -in "$tls/server.pem" >/dev/null 2>&1 &&
        openssl x509 -checkend 86400 -noout -in "$tls/ca.pem" >/dev/null 2>&1; then
        return 0
    fi
    fm_log "making a local CA and server certificate in $tls (openssl)"
    local work
    work=$(mktemp -d "$tls/new.XXXXXX")
    (
        set -e
        umask 077
        cd "$work"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj "/CN=fluxmesh local CA" -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout ca.key -out ca.pem
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=localhost" -keyout server.key -out server.csr
        cat >server.ext <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EXT
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
            -days 825 -extfile server.ext -out server.pem
        openssl verify -CAfile ca.pem server.pem
    ) >"$work/openssl.log" 2>&1 || { cat "$work/openssl.log" >&2; rm -rf "$work"; fm_die "openssl failed"; }
    local f
    for f in ca.key ca.pem server.key server.pem; do mv -f "$work/$f" "$tls/$f"; done
    rm -rf "$work"
    chmod 600 "$tls/ca.key" "$tls/server.key"
    chmod 644 "$tls/ca.pem" "$tls/server.pem"
}
