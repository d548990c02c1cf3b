#!/usr/bin/env bash
# Load soak of the reference proxy: holds keep-alive connections and open SSE streams against
# `llmgate serve` for a while, samples the proxy's RSS, file descriptors, connections and error
# counts, and writes a table and a JSON result. See docs/reliability.md ("Soak").
#
#   scripts/soak.sh                         # 10 minutes, hyper engine
#   scripts/soak.sh --duration 60 --engine pingora
#   SOAK_SECONDS=120 SOAK_RESULT=/tmp/soak.json scripts/soak.sh
#
# Settings (flag or environment variable, default):
#   --duration / SOAK_SECONDS        how long the load runs, in seconds (600)
#   --engine / SOAK_ENGINE           hyper | pingora (hyper)
#   --connections / SOAK_CONNECTIONS keep-alive connections sending JSON completions (2000)
#   --streams / SOAK_STREAMS         SSE streams open at any time (500)
#   --qps / SOAK_QPS                 JSON completions per second over all keep-alive connections (200)
#   --sample / SOAK_SAMPLE_SECONDS   seconds between two samples (15)
#   --result / SOAK_RESULT           the JSON result (target/soak/result.json)
#   SOAK_LOG_LEVEL                   the proxy's LOG_LEVEL (warn)
#
# What runs, all on loopback and stopped at the end: a redis-server on a free port in a
# temporary directory; `llmgate mock-upstream` (each stream has 20 chunks 500 ms apart, so it
# stays open ~10 s); `llmgate serve` (release build) with every layer on as in production:
# API-key auth, Redis-backed insertion ids and rate limits, a model catalogue with limits and
# fallbacks, context routing, Langfuse export (to `langfuse-stand-in`, which checks and counts
# every batch), and metrics on a second port; two `oha` runs on rollout routes spread over 1,000 rollouts, one
# paced over the keep-alive connections, one keeping the streams open back to back.
#
# Installs what it needs when missing (scripts/lib.sh): redis-server, jq, curl, iproute2 and
# cmake (apt-get), oha (`cargo install oha --locked`). Exits non-zero when a request failed (a
# non-2xx answer or a transport error; the requests still running when the time is up are cut on
# purpose and not counted), the proxy died, or its RSS did not stay flat.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

seconds="${SOAK_SECONDS:-600}"
engine="${SOAK_ENGINE:-hyper}"
connections="${SOAK_CONNECTIONS:-2000}"
streams="${SOAK_STREAMS:-500}"
qps="${SOAK_QPS:-200}"
sample="${SOAK_SAMPLE_SECONDS:-15}"
result="${SOAK_RESULT:-target/soak/result.json}"
log_level="${SOAK_LOG_LEVEL:-warn}"
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) seconds="$2"; shift 2 ;;
        --engine) engine="$2"; shift 2 ;;
        --connections) connections="$2"; shift 2 ;;
        --streams) streams="$2"; shift 2 ;;
        --qps) qps="$2"; shift 2 ;;
        --sample) sample="$2"; shift 2 ;;
        --result) result="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$engine" in hyper|pingora) ;; *) echo "--engine must be hyper or pingora" >&2; exit 2 ;; esac
for n in "$seconds" "$connections" "$streams" "$qps" "$sample"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "not a positive integer: $n" >&2; exit 2; }
done

# === what it needs ===

. scripts/lib.sh
install_missing redis-server:redis-server jq:jq curl:curl ss:iproute2 cmake:cmake
install_oha
cargo build --release -p llmgate --features pingora --bin llmgate
cargo build --release -p llmgate-test-support --bin langfuse-stand-in
# What was built: the commit, marked when the sources differed from it.
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- src layers Cargo.toml Cargo.lock 2>/dev/null || commit+="+uncommitted"
bin="$root/target/release/llmgate"

# Client sockets on both ends of every connection, plus the upstream pool.
want_fds=$((2 * connections + 4 * streams + 1024))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_fds" ]; then
    echo "ulimit -n is $(ulimit -n), below the $want_fds this soak needs (raise the hard limit)" >&2
    exit 1
fi

# === processes (stopped on exit) ===

work="$(mktemp -d -t llmgate-soak.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sets the variable named $1 to a free port below the kernel's ephemeral range (so no client
# socket takes it meanwhile), never one handed out before.
taken=" "
free_port() {
    local candidate
    while :; do
        candidate=$((20000 + RANDOM % 12000))
        if [[ "$taken" != *" $candidate "* ]] && [ -z "$(ss -Htan "( sport = :$candidate )" 2>/dev/null)" ]; then
            taken+="$candidate "
            printf -v "$1" "%s" "$candidate"
            return
        fi
    done
}

# Waits until `curl` gets an answer from $1.
wait_for() {
    for _ in $(seq 1 200); do
        curl -s -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "nothing answers at $1" >&2
    return 1
}

free_port redis_port
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
    --maxclients 10000 >"$work/redis.log" 2>&1 &
pids+=($!)

free_port mock_port
"$bin" mock-upstream --port "$mock_port" --chunks 20 --chunk-delay-ms 500 >"$work/mock.log" 2>&1 &
pids+=($!)

free_port langfuse_port
"$root/target/release/langfuse-stand-in" --port "$langfuse_port" --project soak:pk-lf-soak:sk-lf-soak \
    >"$work/langfuse.log" 2>&1 &
pids+=($!)

free_port port
free_port metrics_port
key="soak-$(date +%s)-$RANDOM"
cat >"$work/secrets.yaml" <<EOF
langfuse_keys:
  soak: {public_key: pk-lf-soak, secret_key: sk-lf-soak}
default_project_id: soak
EOF
cat >"$work/llmgate.yaml" <<EOF
listen: "127.0.0.1:$port"
engine: $engine
request_timeout_secs: 60
drain_timeout_secs: 5
upstreams:
  mock: {url: "http://127.0.0.1:$mock_port/v1", mode: openai}
default_upstream: mock
models:
  - name: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    limits: {rpm: 10000000, tpm: 10000000000, rpd: null}
    pricing: {input_per_1m: 0.15, output_per_1m: 0.6}
    fallbacks: [gpt-4o]
  - name: gpt-4o
    context_window: 128000
    limits: {rpm: 10000000, tpm: 10000000000, rpd: null}
    pricing: {input_per_1m: 2.5, output_per_1m: 10}
redis: {url: "redis://127.0.0.1:$redis_port"}
langfuse:
  host: "http://127.0.0.1:$langfuse_port"
  secrets_path: "$work/secrets.yaml"
  emit: all
  export: {batch_max_spans: 512, batch_delay_ms: 1000, queue_max_spans: 8192, timeout_ms: 10000}
auth: {api_keys: ["$key"]}
rate_limit: {max_wait_seconds: 0, on_redis_outage: fail_open}
metrics: {listen: "127.0.0.1:$metrics_port"}
EOF
wait_for "http://127.0.0.1:$mock_port/health"
wait_for "http://127.0.0.1:$langfuse_port/"
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
"$bin" check-config --config "$work/llmgate.yaml" >/dev/null
LOG_LEVEL="$log_level" "$bin" serve --config "$work/llmgate.yaml" >"$work/llmgate.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
wait_for "http://127.0.0.1:$port/health"

# === load ===

route="http://127.0.0.1:$port/rollout_id/soak-[0-9]{3}/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w[0-9]{2}/chat/completions"
json_body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
sse_body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Count to twenty."}],"stream":true,"stream_options":{"include_usage":true}}'
oha_common=(--no-tui --rand-regex-url -m POST -T application/json -H "authorization: Bearer $key"
    -t 60s -z "${seconds}s" --output-format json)

started=$(date +%s)
oha "${oha_common[@]}" -c "$connections" -q "$qps" -d "$json_body" -o "$work/json.json" "$route" \
    >"$work/oha-json.log" 2>&1 &
json_pid=$!
pids+=("$json_pid")
oha "${oha_common[@]}" -c "$streams" -d "$sse_body" -o "$work/sse.json" "$route" >"$work/oha-sse.log" 2>&1 &
sse_pid=$!
pids+=("$sse_pid")

# One sample: seconds since the start, RSS (KiB), fds, established client connections, open
# streams, 2xx and other answers so far, insertion ids recorded and pending, Langfuse spans
# exported, Redis errors.
sample_once() {
    local rss fds conns metrics
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$gateway_pid/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$gateway_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    conns=$(ss -Htn state established "( sport = :$port )" 2>/dev/null | wc -l)
    metrics=$(curl -s --max-time 5 "http://127.0.0.1:$metrics_port/metrics" || true)
    awk -v t="$(($(date +%s) - started))" -v rss="$rss" -v fds="$fds" -v conns="$conns" '
        /^llmgate_requests_total\{/ && /route="chat"/ {
            if ($0 ~ /status="2[0-9][0-9]"/) ok += $NF; else bad += $NF
        }
        /^llmgate_open_streams / { open = $NF }
        /^llmgate_insertion_records_total\{outcome="recorded"\}/ { recorded = $NF }
        /^llmgate_insertion_records_pending / { pending = $NF }
        /^llmgate_langfuse_spans_total\{/ && /outcome="exported"/ { spans += $NF }
        /^llmgate_redis_errors_total / { redis = $NF }
        END {
            printf "{\"t\":%d,\"rss_kib\":%d,\"fds\":%d,\"connections\":%d,\"open_streams\":%d,", t, rss, fds, conns, open
            printf "\"ok\":%d,\"errors\":%d,\"ids_recorded\":%d,\"ids_pending\":%d,\"spans_exported\":%d,\"redis_errors\":%d}\n", ok, bad, recorded, pending, spans, redis
        }' <<<"$metrics"
}

print_row() {
    jq -r '[.t, (.rss_kib / 1024 | floor), .fds, .connections, .open_streams, .ok, .errors, .ids_recorded, .ids_pending, .spans_exported]
        | @tsv' <<<"$1" | awk -F'\t' '{printf "%6ss %8s %7s %7s %7s %10s %7s %10s %8s %10s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10}'
}

echo "soak: engine $engine, ${seconds}s, $connections keep-alive connections at $qps req/s, $streams open streams"
printf "%7s %8s %7s %7s %7s %10s %7s %10s %8s %10s\n" time "RSS MiB" fds conns streams "2xx" errors "ids" pending spans
samples="$work/samples.jsonl"
: >"$samples"
while kill -0 "$json_pid" 2>/dev/null || kill -0 "$sse_pid" 2>/dev/null; do
    if ! kill -0 "$gateway_pid" 2>/dev/null; then
        echo "the proxy exited during the soak; its log: $work/llmgate.log" >&2
        tail -20 "$work/llmgate.log" >&2
        exit 1
    fi
    row=$(sample_once)
    echo "$row" >>"$samples"
    print_row "$row"
    # Sleep in short steps so the loop ends soon after the load does.
    for _ in $(seq 1 "$sample"); do
        kill -0 "$json_pid" 2>/dev/null || kill -0 "$sse_pid" 2>/dev/null || break
        sleep 1
    done
done
wait "$json_pid" || true
wait "$sse_pid" || true
sleep 2
row=$(sample_once)
echo "$row" >>"$samples"
print_row "$row"
gateway_alive=true
kill -0 "$gateway_pid" 2>/dev/null || gateway_alive=false

# === result ===

for f in json sse; do
    [ -s "$work/$f.json" ] || { echo "oha wrote no result for the $f load:" >&2; cat "$work/oha-$f.log" >&2; exit 1; }
done
mkdir -p "$(dirname "$result")"
jq -n \
    --slurpfile json "$work/json.json" \
    --slurpfile sse "$work/sse.json" \
    --slurpfile samples <(jq -s . "$samples") \
    --arg engine "$engine" --arg started "$(date -u -d "@$started" +%Y-%m-%dT%H:%M:%SZ)" \
    --arg machine "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)" \
    --arg commit "$commit" \
    --argjson seconds "$seconds" --argjson connections "$connections" --argjson streams "$streams" \
    --argjson qps "$qps" --argjson alive "$gateway_alive" '
    def load($o): {
        requests: ([$o.statusCodeDistribution[]] | add // 0),
        status: $o.statusCodeDistribution,
        non_2xx: ([$o.statusCodeDistribution | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0),
        transport_errors: ([$o.errorDistribution | to_entries[] | select(.key != "aborted due to deadline") | .value] | add // 0),
        errors: ($o.errorDistribution | with_entries(select(.key != "aborted due to deadline"))),
        cut_at_the_end: ($o.errorDistribution["aborted due to deadline"] // 0),
        requests_per_sec: $o.summary.requestsPerSec,
        latency_s: {p50: $o.latencyPercentiles.p50, p99: $o.latencyPercentiles.p99, max: $o.summary.slowest}
    };
    ($samples[0]) as $s
    | ($s | length) as $n
    # RSS after the ramp-up (the first fifth of the samples, at least one) against the last fifth.
    | ([1, ($n / 5 | floor)] | max) as $k
    | ([$s[1:$k + 1][].rss_kib] | if length == 0 then [$s[0].rss_kib] else . end | sort | .[length / 2 | floor]) as $early
    | ([$s[-$k:][].rss_kib] | sort | .[length / 2 | floor]) as $late
    # The trend over the second half of the load (least squares), in MiB per hour.
    | ([$s[:-1][] | select(.t >= $seconds / 2)]) as $h
    | (if ($h | length) < 2 then null else
        ([$h[].t] | add / length) as $mt | ([$h[].rss_kib] | add / length) as $mr
        | ([$h[] | (.t - $mt) * (.t - $mt)] | add) as $var
        | if $var == 0 then null
          else ([$h[] | (.t - $mt) * (.rss_kib - $mr)] | add) / $var * 3600 / 1024 * 10 | round / 10 end
      end) as $slope
    | (load($json[0])) as $j | (load($sse[0])) as $e
    | {
        started: $started, commit: $commit, engine: $engine, machine: $machine,
        duration_s: $seconds, keep_alive_connections: $connections, json_qps: $qps, open_streams: $streams,
        json: $j, sse: $e,
        failed_requests: ($j.non_2xx + $j.transport_errors + $e.non_2xx + $e.transport_errors),
        gateway_alive: $alive,
        max_connections: ([$s[].connections] | max), max_open_streams: ([$s[].open_streams] | max),
        rss_kib: {early_median: $early, late_median: $late, max: ([$s[].rss_kib] | max),
                  growth_pct: (if $early > 0 then (($late - $early) * 1000 / $early | round) / 10 else null end),
                  second_half_trend_mib_per_hour: $slope},
        # Flat: the late median within 10 % (or 16 MiB) of the median after the ramp-up.
        rss_flat: ($late <= ([$early * 1.10, $early + 16384] | max)),
        samples: $s
    }' >"$result"

jq -r '"
JSON completions: \(.json.requests) requests (\(.json.requests_per_sec | floor)/s), \(.json.non_2xx) non-2xx, \(.json.transport_errors) transport errors, p50 \(.json.latency_s.p50 * 1000 | floor) ms, p99 \(.json.latency_s.p99 * 1000 | floor) ms
SSE streams:      \(.sse.requests) streams (\(.sse.requests_per_sec | floor)/s), \(.sse.non_2xx) non-2xx, \(.sse.transport_errors) transport errors, p50 \(.sse.latency_s.p50 | . * 10 | floor / 10) s
cut at the end on purpose: \(.json.cut_at_the_end + .sse.cut_at_the_end)
connections held: up to \(.max_connections); open streams: up to \(.max_open_streams)
RSS: \(.rss_kib.early_median / 1024 | floor) MiB after ramp-up, \(.rss_kib.late_median / 1024 | floor) MiB at the end (\(.rss_kib.growth_pct) %), max \(.rss_kib.max / 1024 | floor) MiB, second-half trend \(.rss_kib.second_half_trend_mib_per_hour) MiB/h: \(if .rss_flat then "flat" else "NOT flat" end)
failed requests: \(.failed_requests); proxy alive at the end: \(.gateway_alive)
result: '"$result"'"' "$result"

jq -e '.failed_requests == 0 and .rss_flat and .gateway_alive' "$result" >/dev/null
