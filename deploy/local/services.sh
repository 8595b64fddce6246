#!/usr/bin/env bash
# Installs and runs Tollgate's backing services on loopback, without Docker:
# Kafka 4 (KRaft, single node), ClickHouse, PostgreSQL (Debian's major), Redis 7 and stripe-mock.
#
#   deploy/local/services.sh [up]          install what is missing, start what is not running
#   deploy/local/services.sh install       install only
#   deploy/local/services.sh down          stop what this script started (by pid file)
#   deploy/local/services.sh status        one line per service
#   deploy/local/services.sh start|stop|kill9 SERVICE
#   deploy/local/services.sh env           export lines: eval "$(deploy/local/services.sh env)"
#   deploy/local/services.sh kafka-topics ARGS...   Kafka's TopicCommand against the local broker
#   deploy/local/services.sh kafka-delete-records ARGS...   Kafka's DeleteRecordsCommand against it
#
# It also installs chdb (ClickHouse 24.8's engine, embedded in a Python package) for the
# test that replays every ClickHouse statement Tollgate issues on the release docker-compose.yml
# pins; nothing runs as a service for it.
#
# State (data, logs, pid files, Kafka jars, stripe-mock binary, chdb) lives in
# ${TOLLGATE_STATE_DIR:-<repo>/.run}. Every service binds 127.0.0.1 only.
#
# Addresses and their environment overrides (`env` prints the first of each line):
#   TOLLGATE_KAFKA_BROKERS=127.0.0.1:19092      TOLLGATE_KAFKA_CONTROLLER_PORT=19093
#   TOLLGATE_CLICKHOUSE_ADDR=127.0.0.1:19000    TOLLGATE_CLICKHOUSE_HTTP_PORT=18123
#   TOLLGATE_POSTGRES_URL=postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable
#   TOLLGATE_REDIS_ADDR=127.0.0.1:16379
#   TOLLGATE_STRIPE_MOCK_URL=http://127.0.0.1:12111  TOLLGATE_STRIPE_MOCK_HTTPS_PORT=12112
# Timeouts: TOLLGATE_SERVICES_TIMEOUT=60, TOLLGATE_KAFKA_TIMEOUT=120 (seconds).
# Kafka's optional SASL_SSL client listener, off unless TOLLGATE_KAFKA_SECURE_PORT is set:
#   TOLLGATE_KAFKA_SECURE_PORT=PORT        SASL_SSL://127.0.0.1:PORT beside the PLAINTEXT one
#   TOLLGATE_KAFKA_TLS_KEYSTORE=FILE       PEM: the broker's unencrypted PKCS#8 key and its certificate chain
#   TOLLGATE_KAFKA_TLS_TRUSTSTORE=FILE     PEM: CA certificates; when set, the listener takes only clients
#                                          with a certificate one of them signed (ssl.client.auth=required)
#   TOLLGATE_KAFKA_SASL_USER, TOLLGATE_KAFKA_SASL_PASSWORD   the one user, for PLAIN,
#     SCRAM-SHA-256 and SCRAM-SHA-512 (letters, digits, '.', '_', '-'; SCRAM
#     credentials are added when the storage is formatted)
# Redis's optional TLS listener, off unless TOLLGATE_REDIS_TLS_PORT is set:
#   TOLLGATE_REDIS_TLS_PORT=PORT           tls-port on 127.0.0.1:PORT beside the plain port
#   TOLLGATE_REDIS_TLS_CERT, TOLLGATE_REDIS_TLS_KEY   PEM: the server's certificate (chain) and unencrypted key
#   TOLLGATE_REDIS_TLS_CA=FILE             PEM: the CA Redis loads
#   TOLLGATE_REDIS_TLS_AUTH_CLIENTS=yes    take only clients with a certificate that CA signed (default no:
#                                          clients are not asked for certificates)
# ClickHouse's optional secure native-protocol port, off unless TOLLGATE_CLICKHOUSE_TLS_PORT is set:
#   TOLLGATE_CLICKHOUSE_TLS_PORT=PORT      tcp_port_secure on 127.0.0.1:PORT beside the plain native and HTTP ports
#   TOLLGATE_CLICKHOUSE_TLS_CERT, TOLLGATE_CLICKHOUSE_TLS_KEY   PEM: the server's certificate (chain) and unencrypted key
# PostgreSQL: Debian's installed major, or TOLLGATE_PG_BIN=<its bin directory>.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
STATE=${TOLLGATE_STATE_DIR:-$REPO_ROOT/.run}
KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
STRIPE_MOCK_VERSION=v0.180.0
# chdb 2.1.1 embeds ClickHouse 24.8.4, the release docker-compose.yml pins.
CHDB_VERSION=2.1.1

SERVICES=(kafka clickhouse postgres redis stripe-mock)
APT_PACKAGES=(redis-server clickhouse-server clickhouse-client nginx-light wrk kcat)

# Connection settings. Other code reads the same variables with the same defaults;
# when one is set, the service is started on the port it names.
TOLLGATE_KAFKA_BROKERS=${TOLLGATE_KAFKA_BROKERS:-127.0.0.1:19092}
TOLLGATE_CLICKHOUSE_ADDR=${TOLLGATE_CLICKHOUSE_ADDR:-127.0.0.1:19000}
TOLLGATE_POSTGRES_URL=${TOLLGATE_POSTGRES_URL:-postgres://tollgate@127.0.0.1:15432/tollgate?sslmode=disable}
TOLLGATE_REDIS_ADDR=${TOLLGATE_REDIS_ADDR:-127.0.0.1:16379}
TOLLGATE_STRIPE_MOCK_URL=${TOLLGATE_STRIPE_MOCK_URL:-http://127.0.0.1:12111}

first_broker=${TOLLGATE_KAFKA_BROKERS%%,*}
KAFKA_PORT=${first_broker##*:}
KAFKA_CONTROLLER_PORT=${TOLLGATE_KAFKA_CONTROLLER_PORT:-19093}
KAFKA_SECURE_PORT=${TOLLGATE_KAFKA_SECURE_PORT:-}
CLICKHOUSE_PORT=${TOLLGATE_CLICKHOUSE_ADDR##*:}
CLICKHOUSE_HTTP_PORT=${TOLLGATE_CLICKHOUSE_HTTP_PORT:-18123}
CLICKHOUSE_DATABASE=${TOLLGATE_CLICKHOUSE_DATABASE:-tollgate}
CLICKHOUSE_TLS_PORT=${TOLLGATE_CLICKHOUSE_TLS_PORT:-}
# The port, role and database TOLLGATE_POSTGRES_URL names, as tollgate reads
# them (libpq's rules): no port is 5432, no user the system user, no
# database the user's name; port=, user= and dbname= in the query count.
# A URL this script cannot read (several hosts, a socket directory, the
# keyword form) is refused when Postgres is started, not guessed at.
PG_PORT=15432 PG_ROLE=tollgate PG_DB=tollgate PG_URL_UNREADABLE=
pct_decode() { printf '%b' "${1//%/\\x}"; }
if [[ $TOLLGATE_POSTGRES_URL =~ ^postgres(ql)?://(([^@/?]*)@)?(\[[^]/?]*\]|[^]/:?,[]*)(:([0-9]*))?(/([^?]*))?(\?(.*))?$ ]]; then
  pg_user=${BASH_REMATCH[3]%%:*} pg_port=${BASH_REMATCH[6]} pg_db=${BASH_REMATCH[8]} pg_query=${BASH_REMATCH[10]}
  [[ -n ${BASH_REMATCH[4]} ]] || PG_URL_UNREADABLE=1 # no host: a socket directory
  IFS='&' read -ra pg_params <<<"$pg_query"
  for p in "${pg_params[@]}"; do
    case $p in
      port=*) pg_port=${p#port=} ;;
      user=*) pg_user=${p#user=} ;;
      dbname=*) pg_db=${p#dbname=} ;;
      host=* | hostaddr=*) PG_URL_UNREADABLE=1 ;;
    esac
  done
  PG_PORT=${pg_port:-5432}
  PG_ROLE=$(pct_decode "${pg_user:-$(id -un)}")
  PG_DB=$(pct_decode "${pg_db:-$PG_ROLE}")
  [[ $PG_PORT =~ ^[0-9]+$ ]] || PG_URL_UNREADABLE=1
else
  PG_URL_UNREADABLE=1
fi
REDIS_PORT=${TOLLGATE_REDIS_ADDR##*:}
REDIS_TLS_PORT=${TOLLGATE_REDIS_TLS_PORT:-}
if [[ $TOLLGATE_STRIPE_MOCK_URL =~ :([0-9]+)/?$ ]]; then STRIPE_PORT=${BASH_REMATCH[1]}; else STRIPE_PORT=12111; fi
STRIPE_HTTPS_PORT=${TOLLGATE_STRIPE_MOCK_HTTPS_PORT:-12112}

READY_TIMEOUT=${TOLLGATE_SERVICES_TIMEOUT:-60}
KAFKA_READY_TIMEOUT=${TOLLGATE_KAFKA_TIMEOUT:-120}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx768m -Xms256m}

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------- helpers

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

pid_file() { echo "$STATE/pids/$1.pid"; }

# What the command line of each service's main process contains; guards
# against signalling an unrelated process that reused a stale pid.
proc_pattern() {
  case $1 in
    kafka) echo kafka.Kafka ;;
    clickhouse) echo clickhouse ;;
    postgres) echo postgres ;;
    redis) echo redis-server ;;
    stripe-mock) echo stripe-mock ;;
  esac
}

# Prints the pid of the service if its pid file names a live process of that service.
live_pid() {
  local f pid ticks state
  f=$(pid_file "$1")
  [[ -s $f ]] || return 1
  read -r pid ticks <"$f" || [[ -n $pid ]] || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/stat ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(proc_pattern "$1")" || return 1
  # The pid file holds the process's start time too (see launch): a process
  # that took over a stale pid started at another time. (The command line
  # alone let a stale pid name any process with the service's name in its
  # arguments, such as an editor on postgres.conf, which `down` would then
  # have stopped.) A pid file written before it held the start time is
  # judged by its age instead.
  if [[ -n $ticks ]]; then
    [[ $(start_ticks "$pid") == "$ticks" ]] || return 1
  else
    started_by_then "$pid" "$f" || return 1
  fi
  echo "$pid"
}

# When process pid started, in clock ticks from boot: field 22 of its stat,
# counted after the command name (field 2, which may hold spaces). Exec keeps
# it, and a clock step does not move it.
start_ticks() {
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'
}

# Whether process pid started no later than file was last written, for a pid
# file that holds no start time: the process writes the file just before it
# execs the service, so the service is older than its pid file, and a process
# that took over a stale pid younger.
started_by_then() {
  local pid=$1 file=$2 ticks boot hz written
  ticks=$(start_ticks "$pid") || return 1
  boot=$(awk '$1 == "btime" {print $2}' /proc/stat) || return 1
  hz=$(getconf CLK_TCK) || return 1
  written=$(stat -c %Y "$file" 2>/dev/null) || return 1
  [[ $ticks =~ ^[0-9]+$ && $boot =~ ^[0-9]+$ && $hz =~ ^[0-9]+$ && $written =~ ^[0-9]+$ ]] || return 1
  # Slack for btime and the file's time being whole seconds, and for a
  # small step of the clock.
  (( boot + ticks / hz <= written + 2 ))
}

# The command prefix that runs a program as a service's system user when root
# (PostgreSQL refuses to run as root); empty otherwise. setpriv execs, so the
# pid is kept.
as_user() {
  if [[ $EUID -eq 0 ]]; then
    printf '%s\n' setpriv --reuid="$1" --regid="$1" --init-groups --
  fi
}

# Starts a command detached from this shell (own session, survives the script),
# stdout/stderr appended to a log. The process writes its own pid before exec.
# It stays this script's child until the script exits, so LAUNCHED_PID lets
# wait_ready tell how it ended if it dies during start-up.
LAUNCHED_PID=
launch() {
  local svc=$1 out=$2; shift 2
  mkdir -p "$STATE/pids" "$(dirname "$out")"
  rm -f "$(pid_file "$svc")"
  printf '\n=== %s starting %s\n' "$(date -u +%FT%TZ)" "$svc" >>"$out"
  # The pid file holds the process's pid and start time (live_pid). No
  # service keeps Kafka's SASL password in its environment, which others of
  # its user could read: the broker reads it from server.properties.
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  # No pid file (a full disk): no service, since nothing could stop it.
  setsid nohup bash -c 't=$(sed "s/.*) //" /proc/$$/stat | awk "{print \$20}") && [[ -n $t ]] &&
    echo "$$ $t" >"$0" && exec env -u TOLLGATE_KAFKA_SASL_PASSWORD "$@"' "$(pid_file "$svc")" "$@" >>"$out" 2>&1 </dev/null 9>&- &
  LAUNCHED_PID=$!
  local i
  for i in $(seq 50); do [[ -s $(pid_file "$svc") ]] && return 0; sleep 0.1; done
  die "$svc: no pid file after launch"
}

# A directory for a service that runs as another user. That user must be able
# to reach it; if the state dir is not reachable (e.g. under /root), the data
# goes to /var/tmp and a symlink in the state dir points at it.
service_dir() {
  local svc=$1 user=$2 dir=$STATE/$1
  if [[ ! -e $dir ]]; then
    if [[ $EUID -eq 0 ]] && ! setpriv --reuid="$user" --regid="$user" --init-groups -- test -x "$STATE"; then
      local alt
      alt=/var/tmp/tollgate-$(printf '%s' "$STATE" | sha1sum | cut -c1-12)/$svc
      mkdir -p "$alt"
      chmod 755 "$(dirname "$alt")"
      ln -s "$alt" "$dir"
      log "$svc: $STATE is not reachable by user $user; data in $alt"
    else
      mkdir -p "$dir"
    fi
  fi
  readlink -f "$dir"
}

# Hands a service's directory to its user (when root), files created by root included.
own_dir() {
  local user=$1 dir=$2
  [[ $EUID -eq 0 ]] || return 0
  if [[ -n $(find "$dir/" ! -user "$user" -print -quit) ]]; then chown -R "$user:$user" "$dir/"; fi
}

# tls_file_check SERVICE PORT_VAR FILE_VAR: stops the script unless FILE_VAR
# names a readable file whose path goes into a configuration file as it is:
# a quote, backslash, '<', '>' or '&' would need escaping in redis.conf or
# config.xml, and a line break would end the setting.
tls_file_check() {
  local svc=$1 port_var=$2 file_var=$3 file=${!3:-}
  [[ -n $file && -r $file && -f $file ]] ||
    die "$svc: $port_var needs $file_var, a readable PEM file"
  case $file in
    *[\"\'\\\<\>\&]* | *$'\n'*)
      die "$svc: $file_var ($file) holds a quote, backslash, '<', '>', '&' or line break; use another path" ;;
  esac
}

show_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    printf -- '----- last 30 lines of %s\n' "$f" >&2
    tail -n 30 "$f" >&2
  done
}

# Whether a process exists and is not a zombie.
running() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ -n $state && $state != Z ]]
}

# How the process launch started last has ended: "exit status N" or "signal S".
exit_cause() {
  local rc=0
  [[ -n $LAUNCHED_PID ]] || { echo "cause unknown"; return; }
  wait "$LAUNCHED_PID" 2>/dev/null || rc=$?
  if ((rc > 128)); then echo "killed by signal $(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))"
  else echo "exit status $rc"; fi
}

# wait_ready SVC TIMEOUT: polls the service's ready check. Returns 3 if the
# process exits first (after printing how, and its logs); exits on timeout.
wait_ready() {
  local svc=$1 timeout=$2 start=$SECONDS logs odd=
  mapfile -t logs < <("logs_${svc//-/_}")
  while ! "ready_${svc//-/_}"; do
    if ! live_pid "$svc" >/dev/null; then
      if [[ -n $LAUNCHED_PID ]] && running "$LAUNCHED_PID"; then
        # Alive, but not as the pid file and command line say (caught mid-exec?).
        if [[ -z $odd ]]; then
          odd=1
          log "$svc: pid $LAUNCHED_PID is alive but does not look like $svc yet ($(tr '\0' ' ' <"/proc/$LAUNCHED_PID/cmdline" 2>/dev/null | cut -c1-120)); waiting"
        fi
      else
        printf 'services: error: %s exited during start-up (%s)\n' "$svc" "$(exit_cause)" >&2
        show_logs "${logs[@]}"
        return 3
      fi
    fi
    if (( SECONDS - start >= timeout )); then
      printf 'services: error: %s did not become ready within %ss\n' "$svc" "$timeout" >&2
      show_logs "${logs[@]}"
      exit 1
    fi
    sleep 0.5
  done
  log "$svc: ready after $((SECONDS - start))s"
}

# ---------------------------------------------------------------- install

# java_version prints the specification version of the java on PATH (17,
# 21, or 1.8 for Java 8), and fails when there is none.
java_version() {
  command -v java >/dev/null || return 1
  java -XshowSettings:properties -version 2>&1 |
    awk -F' = ' '/java.specification.version/ { print $2; found = 1 } END { exit !found }'
}

# check_java stops with what to install unless the java on PATH is 17 or
# later, which Kafka 4 needs.
check_java() {
  local jv
  jv=$(java_version) || die "Kafka 4 needs Java 17 or later, and there is no java on PATH: install openjdk-17-jre-headless"
  [[ $jv =~ ^([0-9]+) ]] && ((BASH_REMATCH[1] >= 17)) ||
    die "Kafka 4 needs Java 17 or later, and the java on PATH is $jv: install openjdk-17-jre-headless (or newer) and put its java first on PATH"
}

# check_go stops with what to install unless Go 1.21 or later is installed:
# it builds Tollgate and stripe-mock, and fetches the toolchain go.mod names
# by itself. Debian bookworm's golang-go (1.19) cannot read this go.mod.
# The installed Go is asked from outside the repository, so that it does
# not first try to fetch the one go.mod names.
check_go() {
  local gv out
  command -v go >/dev/null || die "Go is not installed: install Go 1.21 or later from https://go.dev/dl and run this again"
  out=$(cd / && GOTOOLCHAIN=local go env GOVERSION 2>&1) || die "go env GOVERSION failed: $out"
  gv=${out##*$'\n'} # the version is the last line, after any warning
  [[ $gv == devel* ]] && return 0
  [[ $gv =~ ^go1\.([0-9]+) ]] && ((BASH_REMATCH[1] >= 21)) ||
    die "Go $gv is too old: install Go 1.21 or later from https://go.dev/dl (it then fetches the Go this project names in go.mod)"
}

install_apt() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  # Debian's own major of PostgreSQL (15 on bookworm, 17 on trixie); any
  # installed major will do, but an existing data directory needs its own.
  if [[ ! -x $(pg_bin)/postgres ]]; then
    if [[ -s $STATE/postgres/data/PG_VERSION ]]; then missing+=("postgresql-$(<"$STATE/postgres/data/PG_VERSION")")
    else missing+=(postgresql); fi
  fi
  # Kafka 4 needs Java 17 or later (check_java, when Kafka starts).
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  check_go
  command -v mvn >/dev/null || missing+=(maven)
  command -v curl >/dev/null || missing+=(curl)
  # Wanted, not needed: the race detector's pass in `make test` needs a C
  # compiler (the Makefile says when it could not run), and the ClickHouse
  # compatibility check a Python venv for chdb (install_chdb says when it
  # has none). Neither stops `up` on a machine where nothing can install.
  local optional=()
  command -v cc >/dev/null || optional+=(gcc)
  python3 -c 'import ensurepip, venv' 2>/dev/null || optional+=(python3 python3-venv)
  ((${#missing[@]} + ${#optional[@]})) || return 0
  if ((EUID != 0)) && ! command -v sudo >/dev/null; then
    ((${#missing[@]})) ||
      { log "apt: not installing ${optional[*]} (needs root or sudo); the checks that use them say so when they run"; return 0; }
    die "installing needs root: run this as root, install sudo, or install these packages yourself first: ${missing[*]} ${optional[*]}"
  fi
  log "apt: installing ${missing[*]}${missing[*]:+ }${optional[*]}"
  # Keep the packages' own init scripts from starting system-wide instances on
  # the default ports: this script runs its own.
  # The file is marked as this script's, and removed however the install
  # ends: left behind (a Ctrl-C during a long first install), it would keep
  # every later package upgrade on the machine from restarting its service.
  # A marked copy an interrupted run left is this script's to remove too.
  local policy=/usr/sbin/policy-rc.d added_policy= marker='# added by tollgate services.sh for its install; removed when it ends'
  if [[ ! -e $policy ]] || grep -qxF "$marker" "$policy" 2>/dev/null; then
    trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'as_root rm -f /usr/sbin/policy-rc.d; exit 130' INT
    trap 'as_root rm -f /usr/sbin/policy-rc.d; exit 143' TERM
    printf '#!/bin/sh\n%s\nexit 101\n' "$marker" | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    added_policy=1
  fi
  # The optional packages go in a call of their own: one that cannot be
  # installed (an offline machine, a user sudo refuses) is said, not fatal.
  local rc=0 orc=0
  as_root apt-get update -q || rc=$?
  if ((rc == 0 && ${#missing[@]})); then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
  fi
  if ((${#optional[@]})); then
    if ((rc == 0)); then
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${optional[@]}" || orc=$?
    else
      orc=$rc
    fi
  fi
  if [[ -n $added_policy ]]; then
    as_root rm -f "$policy"
    trap - EXIT INT TERM
  fi
  if ((${#missing[@]})); then
    ((rc == 0)) || die "apt-get install failed (rc $rc)"
  fi
  ((orc == 0)) || log "apt: could not install ${optional[*]} (rc $orc); the checks that use them say so when they run"
}

install_kafka() {
  local libs=$STATE/kafka/libs sum
  sum=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
  if [[ -f $libs/.pom-sha256 && $(<"$libs/.pom-sha256") == "$sum" ]]; then return 0; fi
  log "kafka: fetching broker jars (mvn dependency:copy-dependencies)"
  # into a new directory first: a running broker keeps its jars until restarted
  rm -rf "$libs.new"
  mkdir -p "$libs.new" "$STATE/logs"
  if ! mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies -DoutputDirectory="$libs.new" >"$STATE/logs/kafka-mvn.log" 2>&1; then
    cat "$STATE/logs/kafka-mvn.log" >&2
    die "kafka: mvn could not fetch the broker jars"
  fi
  echo "$sum" >"$libs.new/.pom-sha256"
  rm -rf "$libs"
  mv "$libs.new" "$libs"
}

install_stripe_mock() {
  local bin=$STATE/bin/stripe-mock
  if [[ -x $bin ]] && go version -m "$bin" 2>/dev/null | grep -q "mod[[:space:]]*github.com/stripe/stripe-mock[[:space:]]*$STRIPE_MOCK_VERSION"; then
    return 0
  fi
  log "stripe-mock: go install github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION"
  mkdir -p "$STATE/bin"
  GOBIN=$STATE/bin GOFLAGS='' go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION" ||
    die "stripe-mock: go install failed"
}

# install_chdb puts chdb in its own virtualenv; the SQL compatibility test
# (internal/chcompat) runs its Python through TOLLGATE_CHDB_PYTHON. No
# service needs it, so a failed install is reported and the rest goes on;
# that test then fails and says how to install it.
install_chdb() {
  local venv=$STATE/chdb
  if [[ -x $venv/bin/python && -f $venv/.version && $(<"$venv/.version") == "$CHDB_VERSION" ]]; then return 0; fi
  log "chdb: pip install chdb==$CHDB_VERSION (ClickHouse 24.8's engine, for the SQL compatibility test)"
  rm -rf "$venv"
  mkdir -p "$STATE/logs"
  if ! { python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q --disable-pip-version-check "chdb==$CHDB_VERSION"; } >"$STATE/logs/chdb-pip.log" 2>&1; then
    tail -n 20 "$STATE/logs/chdb-pip.log" >&2
    log "chdb: warning: could not install chdb==$CHDB_VERSION (log: $STATE/logs/chdb-pip.log); internal/chcompat's test will fail until it is installed"
    rm -rf "$venv"
    return 0
  fi
  echo "$CHDB_VERSION" >"$venv/.version"
}

cmd_install() {
  mkdir -p "$STATE"
  install_apt
  install_kafka
  install_stripe_mock
  install_chdb
}

# ---------------------------------------------------------------- kafka

kafka_cp() { echo "$STATE/kafka/libs/*"; }

kafka_tool() {
  java -Xmx256m -Dlog4j2.configurationFile="$STATE/kafka/tools-log4j2.properties" -cp "$(kafka_cp)" "$@"
}

logs_kafka() { printf '%s\n' "$STATE/logs/kafka.log" "$STATE/logs/kafka.out"; }

ready_kafka() {
  port_open "$KAFKA_PORT" || return 1
  if command -v kcat >/dev/null; then
    # A metadata request that lists this broker means the broker (and its
    # combined controller) is serving.
    timeout 5 kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 3 2>/dev/null | grep -q ' 1 brokers:'
  fi
}

# kafka_secure_check stops the script unless the settings of the SASL_SSL
# listener are complete and can be written into server.properties and the
# format command as they are: the user and password go unquoted into a JAAS
# string and a SCRAM credential, where a quote, comma or bracket would end them.
kafka_secure_check() {
  [[ $KAFKA_SECURE_PORT =~ ^[0-9]+$ ]] || die "kafka: TOLLGATE_KAFKA_SECURE_PORT must be a port number"
  [[ -n ${TOLLGATE_KAFKA_TLS_KEYSTORE:-} && -r $TOLLGATE_KAFKA_TLS_KEYSTORE ]] ||
    die "kafka: TOLLGATE_KAFKA_SECURE_PORT needs TOLLGATE_KAFKA_TLS_KEYSTORE, a readable PEM file with the broker's key and certificate chain"
  [[ -z ${TOLLGATE_KAFKA_TLS_TRUSTSTORE:-} || -r $TOLLGATE_KAFKA_TLS_TRUSTSTORE ]] ||
    die "kafka: TOLLGATE_KAFKA_TLS_TRUSTSTORE must be a readable PEM file of CA certificates"
  [[ ${TOLLGATE_KAFKA_SASL_USER:-} =~ ^[A-Za-z0-9._-]+$ ]] ||
    die "kafka: TOLLGATE_KAFKA_SECURE_PORT needs TOLLGATE_KAFKA_SASL_USER (letters, digits, '.', '_', '-')"
  [[ ${TOLLGATE_KAFKA_SASL_PASSWORD:-} =~ ^[A-Za-z0-9._-]+$ ]] ||
    die "kafka: TOLLGATE_KAFKA_SECURE_PORT needs TOLLGATE_KAFKA_SASL_PASSWORD (letters, digits, '.', '_', '-')"
}

kafka_config() {
  local k=$STATE/kafka secure_listener= secure_protocol=
  mkdir -p "$k/data" "$STATE/logs"
  if [[ -n $KAFKA_SECURE_PORT ]]; then
    kafka_secure_check
    secure_listener=,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT
    secure_protocol=,SASL_SSL:SASL_SSL
    # The file is about to hold the password: made private before it does.
    rm -f "$k/server.properties"
    (umask 077 && : >"$k/server.properties")
  fi
  cat >"$k/server.properties" <<EOF
# Generated by deploy/local/services.sh; edits are overwritten.
node.id=1
process.roles=broker,controller
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT$secure_listener,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT$secure_listener
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT$secure_protocol
log.dirs=$k/data
num.partitions=4
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
log.segment.bytes=104857600
EOF
  if [[ -n $KAFKA_SECURE_PORT ]]; then
    # Clients only: brokers and the controller keep talking PLAINTEXT, so
    # the listener needs no truststore and no credentials of its own. PLAIN
    # checks the password against the JAAS user_ entry; SCRAM against the
    # credentials start_kafka adds when it formats the storage.
    cat >>"$k/server.properties" <<EOF
ssl.keystore.type=PEM
ssl.keystore.location=$TOLLGATE_KAFKA_TLS_KEYSTORE
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$TOLLGATE_KAFKA_SASL_USER="$TOLLGATE_KAFKA_SASL_PASSWORD";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
    if [[ -n ${TOLLGATE_KAFKA_TLS_TRUSTSTORE:-} ]]; then
      # For a SASL_SSL listener only the listener's own ssl.client.auth
      # asks clients for a certificate; the broker-wide one is not read.
      cat >>"$k/server.properties" <<EOF
ssl.truststore.type=PEM
ssl.truststore.location=$TOLLGATE_KAFKA_TLS_TRUSTSTORE
listener.name.sasl_ssl.ssl.client.auth=required
EOF
    else
      echo "listener.name.sasl_ssl.ssl.client.auth=none" >>"$k/server.properties"
    fi
  fi
  cat >"$k/log4j2.properties" <<EOF
status = warn
name = kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $STATE/logs/kafka.log
appender.file.filePattern = $STATE/logs/kafka.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state-change.name = state.change.logger
logger.state-change.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
  kafka_tools_config
}

kafka_tools_config() {
  mkdir -p "$STATE/kafka"
  cat >"$STATE/kafka/tools-log4j2.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
}

start_kafka() {
  local k=$STATE/kafka
  check_java
  kafka_config
  if [[ ! -f $k/data/meta.properties ]]; then
    [[ -s $k/cluster-id ]] || kafka_tool kafka.tools.StorageTool random-uuid >"$k/cluster-id"
    log "kafka: formatting storage (cluster id $(<"$k/cluster-id"))"
    local scram=()
    if [[ -n $KAFKA_SECURE_PORT ]]; then
      # The SCRAM credentials go in through a private argument file that
      # java reads, not on the command line, where ps would show the password.
      local m args=$k/format-scram.args
      rm -f "$args"
      (umask 077 && : >"$args")
      for m in SCRAM-SHA-256 SCRAM-SHA-512; do
        printf -- '--add-scram\n%s=[name=%s,password=%s]\n' "$m" "$TOLLGATE_KAFKA_SASL_USER" "$TOLLGATE_KAFKA_SASL_PASSWORD" >>"$args"
      done
      scram=("@$args")
      log "kafka: adding SCRAM-SHA-256 and SCRAM-SHA-512 credentials for user $TOLLGATE_KAFKA_SASL_USER"
    fi
    # The format command prints the records it bootstraps, the SCRAM
    # credentials' salts and keys among them: those stay out of the log.
    local rc=0
    kafka_tool kafka.tools.StorageTool format --standalone \
      -t "$(<"$k/cluster-id")" -c "$k/server.properties" "${scram[@]}" 2>&1 |
      sed -E 's/UserScramCredentialRecord\([^)]*\)/UserScramCredentialRecord(hidden)/g' >>"$STATE/logs/kafka.out" || rc=$?
    rm -f "$k/format-scram.args"
    ((rc == 0)) || { show_logs "$STATE/logs/kafka.out"; die "kafka: storage format failed"; }
  elif [[ -n $KAFKA_SECURE_PORT ]]; then
    # SCRAM credentials are added only when the storage is formatted.
    log "kafka: storage already formatted; SCRAM logins take the user and password it was formatted with (remove $k/data to format it again)"
  fi
  # shellcheck disable=SC2086 # heap options are a word list
  launch kafka "$STATE/logs/kafka.out" \
    java $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true -Dkafka.logs.dir="$STATE/logs" \
    -Dlog4j2.configurationFile="$k/log4j2.properties" \
    ${KAFKA_OPTS:-} -cp "$(kafka_cp)" kafka.Kafka "$k/server.properties"
}

# ---------------------------------------------------------------- clickhouse

clickhouse_server_bin() {
  if command -v clickhouse-server >/dev/null; then command -v clickhouse-server
  elif [[ -x /usr/sbin/clickhouse-server ]]; then echo /usr/sbin/clickhouse-server
  elif command -v clickhouse >/dev/null; then echo "$(command -v clickhouse) server"
  else die "clickhouse: no clickhouse-server binary (run: $0 install)"; fi
}

clickhouse_client() {
  if command -v clickhouse-client >/dev/null; then timeout 5 clickhouse-client "$@"; else timeout 5 clickhouse client "$@"; fi
}

logs_clickhouse() {
  printf '%s\n' "$STATE/clickhouse/log/clickhouse-server.log" \
    "$STATE/clickhouse/log/clickhouse-server.err.log" "$STATE/logs/clickhouse.out"
}

ready_clickhouse() {
  port_open "$CLICKHOUSE_PORT" &&
    clickhouse_client --host 127.0.0.1 --port "$CLICKHOUSE_PORT" -q 'SELECT 1' >/dev/null 2>&1
}

# clickhouse_tls_copy checks the secure port's settings and copies the
# certificate and key into the server's directory: the server runs as user
# clickhouse, which cannot be assumed to read them where they are (a test's
# private directory, a key only root may read). A certificate or key the
# server cannot load stops it at start-up ("SSL context exception" in its
# log), so ready_clickhouse's check of the plain port covers the secure one;
# probing the secure port as well would log a cut-short handshake per probe.
clickhouse_tls_copy() {
  local d=$1
  [[ $CLICKHOUSE_TLS_PORT =~ ^[0-9]+$ ]] || die "clickhouse: TOLLGATE_CLICKHOUSE_TLS_PORT must be a port number"
  tls_file_check clickhouse TOLLGATE_CLICKHOUSE_TLS_PORT TOLLGATE_CLICKHOUSE_TLS_CERT
  tls_file_check clickhouse TOLLGATE_CLICKHOUSE_TLS_PORT TOLLGATE_CLICKHOUSE_TLS_KEY
  mkdir -p "$d/tls"
  install -m 644 "$TOLLGATE_CLICKHOUSE_TLS_CERT" "$d/tls/server.crt"
  install -m 600 "$TOLLGATE_CLICKHOUSE_TLS_KEY" "$d/tls/server.key"
}

# clickhouse_tls_config prints config.xml's settings for the secure native
# port, with the files clickhouse_tls_copy put in directory $1.
clickhouse_tls_config() {
  local d=$1
  # Clients are not asked for certificates (verificationMode none), so
  # no CA is loaded. No dhParamsFile: the server falls back to built-in
  # parameters, and clients that offer ECDHE never use them.
  cat <<EOF
    <tcp_port_secure>$CLICKHOUSE_TLS_PORT</tcp_port_secure>
    <openSSL>
        <server>
            <certificateFile>$d/tls/server.crt</certificateFile>
            <privateKeyFile>$d/tls/server.key</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
EOF
}

start_clickhouse() {
  local d tls=
  d=$(service_dir clickhouse clickhouse)
  mkdir -p "$d/data" "$d/tmp" "$d/user_files" "$d/format_schemas" "$d/log"
  rm -rf "$d/tls" # a certificate of an earlier start with the secure port
  if [[ -n $CLICKHOUSE_TLS_PORT ]]; then
    clickhouse_tls_copy "$d"
    tls=$(clickhouse_tls_config "$d")
  fi
  cat >"$d/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Generated by deploy/local/services.sh; edits are overwritten. -->
<yandex>
    <logger>
        <level>information</level>
        <log>$d/log/clickhouse-server.log</log>
        <errorlog>$d/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>$CLICKHOUSE_PORT</tcp_port>
    <http_port>$CLICKHOUSE_HTTP_PORT</http_port>
${tls:+$tls
}    <!-- no interserver_http_port: no replication, nothing else listens -->
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>536870912</mark_cache_size>
    <path>$d/data/</path>
    <tmp_path>$d/tmp/</tmp_path>
    <user_files_path>$d/user_files/</user_files_path>
    <format_schema_path>$d/format_schemas/</format_schema_path>
    <users_config>$d/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
    <query_log>
        <database>system</database>
        <table>query_log</table>
        <partition_by>toYYYYMM(event_date)</partition_by>
        <flush_interval_milliseconds>7500</flush_interval_milliseconds>
    </query_log>
    <!-- tests drop tables freely -->
    <max_table_size_to_drop>0</max_table_size_to_drop>
    <max_partition_size_to_drop>0</max_partition_size_to_drop>
</yandex>
EOF
  cat >"$d/users.xml" <<'EOF'
<?xml version="1.0"?>
<!-- Generated by deploy/local/services.sh; edits are overwritten. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
        <readonly>
            <readonly>1</readonly>
        </readonly>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
  own_dir clickhouse "$d"
  local bin user
  bin=$(clickhouse_server_bin)
  mapfile -t user < <(as_user clickhouse)
  # shellcheck disable=SC2086 # bin may be "clickhouse server"
  launch clickhouse "$STATE/logs/clickhouse.out" "${user[@]}" $bin --config-file="$d/config.xml"
}

# ---------------------------------------------------------------- postgres

logs_postgres() { echo "$STATE/logs/postgres.log"; }

pg_socket_dir() {
  local dir=$1/run
  # a unix socket path is limited to 107 bytes
  if (( ${#dir} + 20 > 107 )); then dir=/tmp/tollgate-pg-$(printf '%s' "$STATE" | sha1sum | cut -c1-12); fi
  echo "$dir"
}

# PostgreSQL's binaries: TOLLGATE_PG_BIN when set; else those of the major
# version the data directory was made with (a data directory only opens
# with its own major); else the newest major installed. Debian keeps each
# major in /usr/lib/postgresql/<major>/bin. Empty when none is installed.
pg_bin() {
  if [[ -n ${TOLLGATE_PG_BIN:-} ]]; then echo "$TOLLGATE_PG_BIN"; return; fi
  local made=$STATE/postgres/data/PG_VERSION b
  if [[ -s $made ]]; then echo "/usr/lib/postgresql/$(<"$made")/bin"; return; fi
  for b in $(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -t/ -k5,5nr); do
    [[ -x $b ]] && { echo "${b%/initdb}"; return; }
  done
  return 0
}

ready_postgres() {
  local PGBIN
  PGBIN=$(pg_bin)
  port_open "$PG_PORT" && "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 2
}

# pg_url_readable stops the script when TOLLGATE_POSTGRES_URL is a form it
# cannot read the port, role and database of.
pg_url_readable() {
  [[ -z $PG_URL_UNREADABLE ]] ||
    die "postgres: cannot read the port, role and database of TOLLGATE_POSTGRES_URL; this script starts PostgreSQL on 127.0.0.1, so give it as postgres://USER@127.0.0.1:PORT/DATABASE"
}

# The role and database the URL names, created once (trust auth on loopback).
postgres_bootstrap() {
  pg_url_readable
  local PGBIN
  PGBIN=$(pg_bin)
  "$PGBIN/psql" -X -q -tA "$TOLLGATE_POSTGRES_URL" -c 'SELECT 1' >/dev/null 2>&1 && return 0
  local name
  for name in "$PG_ROLE" "$PG_DB"; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
      die "postgres: cannot create role or database \"$name\" from TOLLGATE_POSTGRES_URL (letters, digits and _ only); create it yourself"
  done
  local psql=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tA)
  if [[ $("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='$PG_ROLE'") != 1 ]]; then
    "${psql[@]}" -c "CREATE ROLE \"$PG_ROLE\" SUPERUSER LOGIN"
  fi
  if [[ $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$PG_DB'") != 1 ]]; then
    "${psql[@]}" -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_ROLE\""
  fi
}

start_postgres() {
  pg_url_readable
  local PGBIN
  PGBIN=$(pg_bin)
  [[ -x $PGBIN/postgres ]] || die "postgres: ${PGBIN:-PostgreSQL} not installed (run: $0 install, or set TOLLGATE_PG_BIN)"
  local d sock user
  d=$(service_dir postgres postgres)
  mapfile -t user < <(as_user postgres)
  sock=$(pg_socket_dir "$d")
  mkdir -p "$sock"
  own_dir postgres "$sock"
  if [[ ! -s $d/data/PG_VERSION ]]; then
    # initdb works in data.init, renamed to data once it is done: a run cut
    # short (Ctrl-C, a full disk) leaves no half-made cluster under data for
    # the next start to trip on, only data.init, which is made again.
    if [[ -d $d/data && -n $(ls -A "$d/data") ]]; then
      die "postgres: $d/data holds files but no PG_VERSION (a cluster made only in part?); move it away and start again"
    fi
    rm -rf "$d/data.init"
    [[ ! -d $d/data ]] || rmdir "$d/data"
    log "postgres: initdb $d/data"
    mkdir -p "$d/data.init"
    chmod 700 "$d/data.init"
    own_dir postgres "$d"
    "${user[@]}" "$PGBIN/initdb" -D "$d/data.init" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth=trust >>"$STATE/logs/postgres.log" 2>&1 ||
      { show_logs "$STATE/logs/postgres.log"; die "postgres: initdb failed"; }
    echo "include_if_exists = 'tollgate.conf'" >>"$d/data.init/postgresql.conf"
    mv "$d/data.init" "$d/data"
  fi
  cat >"$d/data/tollgate.conf" <<EOF
# Generated by deploy/local/services.sh; edits are overwritten.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$sock'
max_connections = 300
shared_buffers = 128MB
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
EOF
  cat >"$d/data/pg_hba.conf" <<'EOF'
# Generated by deploy/local/services.sh: trust, loopback only.
local   all           all                   trust
host    all           all   127.0.0.1/32    trust
local   replication   all                   trust
host    replication   all   127.0.0.1/32    trust
EOF
  own_dir postgres "$d"
  # After a SIGKILL the lock files name a dead postmaster. PostgreSQL removes
  # such files itself, unless that pid is an unreaped zombie (as under an init
  # that does not reap orphans), which it takes for a live server.
  local lock old
  for lock in "$d/data/postmaster.pid" "$sock/.s.PGSQL.$PG_PORT.lock"; do
    [[ -f $lock ]] || continue
    old=$(head -n 1 "$lock")
    old=${old#-}
    if [[ ! $old =~ ^[0-9]+$ || ! -r /proc/$old/stat || $(awk '{print $3}' "/proc/$old/stat" 2>/dev/null) == Z ]]; then
      log "postgres: removing stale $(basename "$lock") (pid $old is gone)"
      rm -f "$lock"
    fi
  done
  launch postgres "$STATE/logs/postgres.log" "${user[@]}" "$PGBIN/postgres" -D "$d/data"
}

# ---------------------------------------------------------------- redis

logs_redis() { echo "$STATE/logs/redis.log"; }

ready_redis() {
  port_open "$REDIS_PORT" && [[ $(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

start_redis() {
  local d=$STATE/redis
  mkdir -p "$d/data"
  cat >"$d/redis.conf" <<EOF
# Generated by deploy/local/services.sh; edits are overwritten.
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize no
# The monthly quota counters live only here: an append-only file keeps
# them across a restart, losing at most the last second's counts.
appendonly yes
appendfsync everysec
dir "$d/data"
logfile ""
EOF
  if [[ -n $REDIS_TLS_PORT ]]; then
    [[ $REDIS_TLS_PORT =~ ^[0-9]+$ ]] || die "redis: TOLLGATE_REDIS_TLS_PORT must be a port number"
    tls_file_check redis TOLLGATE_REDIS_TLS_PORT TOLLGATE_REDIS_TLS_CERT
    tls_file_check redis TOLLGATE_REDIS_TLS_PORT TOLLGATE_REDIS_TLS_KEY
    tls_file_check redis TOLLGATE_REDIS_TLS_PORT TOLLGATE_REDIS_TLS_CA
    local auth_clients=${TOLLGATE_REDIS_TLS_AUTH_CLIENTS:-no}
    [[ $auth_clients == yes || $auth_clients == no ]] || die "redis: TOLLGATE_REDIS_TLS_AUTH_CLIENTS must be yes or no"
    # Redis runs as this script's user and reads the files where they are.
    # It wants a CA even when it asks clients for no certificate. Files it
    # cannot load stop it at start-up ("Failed to configure TLS"), so
    # ready_redis's PING on the plain port covers the TLS port too.
    cat >>"$d/redis.conf" <<EOF
tls-port $REDIS_TLS_PORT
tls-cert-file "$TOLLGATE_REDIS_TLS_CERT"
tls-key-file "$TOLLGATE_REDIS_TLS_KEY"
tls-ca-cert-file "$TOLLGATE_REDIS_TLS_CA"
tls-auth-clients $auth_clients
tls-protocols "TLSv1.2 TLSv1.3"
EOF
  fi
  launch redis "$STATE/logs/redis.log" redis-server "$d/redis.conf"
}

# ---------------------------------------------------------------- stripe-mock

logs_stripe_mock() { echo "$STATE/logs/stripe-mock.log"; }

ready_stripe_mock() {
  port_open "$STRIPE_PORT" &&
    [[ $(curl -s -o /dev/null -w '%{http_code}' -m 3 -u sk_test_123: "http://127.0.0.1:$STRIPE_PORT/v1/customers") == 200 ]]
}

start_stripe_mock() {
  [[ -x $STATE/bin/stripe-mock ]] || die "stripe-mock: $STATE/bin/stripe-mock missing (run: $0 install)"
  launch stripe-mock "$STATE/logs/stripe-mock.log" "$STATE/bin/stripe-mock" \
    -http-addr "127.0.0.1:$STRIPE_PORT" -https-addr "127.0.0.1:$STRIPE_HTTPS_PORT"
}

# ---------------------------------------------------------------- per service

svc_addr() {
  case $1 in
    kafka) echo "127.0.0.1:$KAFKA_PORT" ;;
    clickhouse) echo "127.0.0.1:$CLICKHOUSE_PORT" ;;
    postgres) echo "127.0.0.1:$PG_PORT" ;;
    redis) echo "127.0.0.1:$REDIS_PORT" ;;
    stripe-mock) echo "127.0.0.1:$STRIPE_PORT" ;;
  esac
}

svc_timeout() { if [[ $1 == kafka ]]; then echo "$KAFKA_READY_TIMEOUT"; else echo "$READY_TIMEOUT"; fi; }

check_service() {
  local s
  for s in "${SERVICES[@]}"; do [[ $1 == "$s" ]] && return 0; done
  die "unknown service '$1' (one of: ${SERVICES[*]})"
}

start_service() {
  local svc=$1 fn=${1//-/_} pid
  mkdir -p "$STATE/logs" "$STATE/pids" # `start SERVICE` may come first on a new state directory
  if "ready_$fn"; then
    if pid=$(live_pid "$svc"); then
      log "$svc: already running (pid $pid) on $(svc_addr "$svc"), reusing it"
    else
      log "$svc: something already answers on $(svc_addr "$svc") (not started from $STATE), reusing it"
    fi
  elif pid=$(live_pid "$svc"); then
    log "$svc: pid $pid is starting, waiting for it"
    LAUNCHED_PID=
    wait_ready "$svc" "$(svc_timeout "$svc")" || die "$svc: exited during start-up"
  else
    # A service that dies during start-up is started again, up to three times
    # in all; each failure prints how the process ended and its logs.
    local attempt
    for attempt in 1 2 3; do
      log "$svc: starting on $(svc_addr "$svc")"
      "start_$fn"
      if wait_ready "$svc" "$(svc_timeout "$svc")"; then break; fi
      ((attempt < 3)) || die "$svc: exited during start-up $attempt times; see the logs above"
      log "$svc: starting again (attempt $((attempt + 1)) of 3)"
      sleep 1
    done
  fi
  case $svc in
    postgres) postgres_bootstrap ;;
    clickhouse) clickhouse_client --host 127.0.0.1 --port "$CLICKHOUSE_PORT" -q "CREATE DATABASE IF NOT EXISTS $CLICKHOUSE_DATABASE" ;;
  esac
}

stop_signal() { if [[ $1 == postgres ]]; then echo INT; else echo TERM; fi; }   # INT: fast shutdown

# Graceful stop: the service's own shutdown signal to its main process, then
# SIGKILL to its whole process group (it runs in its own session) after a grace period.
stop_service() {
  local svc=$1 pid grace=30 i
  [[ $svc == kafka ]] && grace=60
  if ! pid=$(live_pid "$svc"); then
    rm -f "$(pid_file "$svc")"
    if "ready_${svc//-/_}"; then
      log "$svc: not started from $STATE (no live pid file) but something answers on $(svc_addr "$svc"); leaving it alone"
    else
      log "$svc: not running"
    fi
    return 0
  fi
  log "$svc: stopping pid $pid (SIG$(stop_signal "$svc"))"
  kill -"$(stop_signal "$svc")" "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 5; i++)); do
    live_pid "$svc" >/dev/null || break
    sleep 0.2
  done
  if live_pid "$svc" >/dev/null; then
    log "$svc: still running after ${grace}s, sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  # children left behind (e.g. PostgreSQL backends)
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$(pid_file "$svc")"
  log "$svc: stopped"
}

kill9_service() {
  local svc=$1 pid
  pid=$(live_pid "$svc") || die "$svc: no live process from $STATE to kill"
  log "$svc: SIGKILL to pid $pid and its process group"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
  local i
  for i in $(seq 50); do live_pid "$svc" >/dev/null || break; sleep 0.1; done
  # The pid file is kept: status reports the service as stopped, start replaces it.
}

# ---------------------------------------------------------------- commands

cmd_env() {
  # Each value quoted for the shell that evals it: a checkout path with a
  # space broke the eval, and `make test` with it.
  printf 'export %s=%q\n' \
    TOLLGATE_KAFKA_BROKERS "$TOLLGATE_KAFKA_BROKERS" \
    TOLLGATE_CLICKHOUSE_ADDR "$TOLLGATE_CLICKHOUSE_ADDR" \
    TOLLGATE_POSTGRES_URL "$TOLLGATE_POSTGRES_URL" \
    TOLLGATE_REDIS_ADDR "$TOLLGATE_REDIS_ADDR" \
    TOLLGATE_STRIPE_MOCK_URL "$TOLLGATE_STRIPE_MOCK_URL" \
    TOLLGATE_CLICKHOUSE_HTTP_PORT "$CLICKHOUSE_HTTP_PORT" \
    TOLLGATE_CHDB_PYTHON "$STATE/chdb/bin/python"
}

cmd_status() {
  local svc pid state
  for svc in "${SERVICES[@]}"; do
    pid=$(live_pid "$svc") || pid=-
    if "ready_${svc//-/_}"; then state=running
    elif [[ $pid != - ]]; then state=starting
    else state=stopped; fi
    [[ $state != running || $pid != - ]] || pid=external
    printf '%-12s %-9s pid=%-9s %s\n' "$svc" "$state" "$pid" "$(svc_addr "$svc")"
  done
}

cmd_up() {
  local t0=$SECONDS svc
  cmd_install
  for svc in "${SERVICES[@]}"; do start_service "$svc"; done
  cat <<EOF

Tollgate services are up (state in $STATE, logs in $STATE/logs) after $((SECONDS - t0))s:
  kafka        $TOLLGATE_KAFKA_BROKERS  (KRaft, controller 127.0.0.1:$KAFKA_CONTROLLER_PORT)
  clickhouse   $TOLLGATE_CLICKHOUSE_ADDR  (native; HTTP http://127.0.0.1:$CLICKHOUSE_HTTP_PORT)
  postgres     $TOLLGATE_POSTGRES_URL
  redis        $TOLLGATE_REDIS_ADDR
  stripe-mock  $TOLLGATE_STRIPE_MOCK_URL  (HTTPS 127.0.0.1:$STRIPE_HTTPS_PORT)

  eval "\$($0 env)"
EOF
}

cmd_down() {
  local i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_service "${SERVICES[i]}"; done
}

usage() {
  local code=${1:-0}
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&$((code == 0 ? 1 : 2))
  exit "$code"
}

main() {
  local cmd=${1:-up}
  [[ $# -eq 0 ]] || shift
  mkdir -p "$STATE"
  STATE=$(cd "$STATE" && pwd)
  case $cmd in
    up | install | down | start | stop | kill9)
      # one changer of a state dir at a time (fd 9 is closed in launched services)
      exec 9>"$STATE/.lock"
      flock -w 900 9 || die "another services.sh holds $STATE/.lock"
      ;;
  esac
  case $cmd in
    up) cmd_up ;;
    install) cmd_install ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    start)
      [[ $# -eq 1 ]] || usage 2
      check_service "$1"
      install_apt
      case $1 in kafka) install_kafka ;; stripe-mock) install_stripe_mock ;; esac
      start_service "$1"
      ;;
    stop)
      [[ $# -eq 1 ]] || usage 2
      check_service "$1"
      stop_service "$1"
      ;;
    kill9)
      [[ $# -eq 1 ]] || usage 2
      check_service "$1"
      kill9_service "$1"
      ;;
    kafka-topics)
      kafka_tools_config
      kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" "$@"
      ;;
    kafka-delete-records)
      kafka_tools_config
      kafka_tool org.apache.kafka.tools.DeleteRecordsCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" "$@"
      ;;
    -h | --help | help) usage ;;
    *) usage 2 ;;
  esac
}

main "$@"
