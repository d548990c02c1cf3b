#!/usr/bin/env python3
"""The end-to-end load benchmark (issue 10). Run it through scripts/bench.sh, which installs
what it needs and builds the release binaries first.

On loopback it starts the mock upstream, a bare proxy hop per engine (`llmgate bare-proxy`: the
same upstream and host, no layers), and the full reference proxy per engine (every layer on:
metadata route, Redis stores, context routing, rate limits with generous budgets, Langfuse export
to the stand-in), then drives each with oha at concurrency 1, 32, 256 and 1,024, JSON and SSE, in
interleaved rounds (medians are reported). It prints and writes RPS, p50/p99 latency, time to
first byte, the latency added over the bare hyper hop, CPU ms per request, Redis CPU µs per
request (from /proc/<redis pid>/stat, for the targets that use Redis) and RSS, checks the
budget, and holds 1,000 open streams against each full proxy for the memory figure.

Every process on the machine is accounted for per run: the proxy, Redis, the Langfuse stand-in,
the mock upstream and the load generator (oha, from the children's rusage), each as CPU per
completed request. Where the cores are saturated, requests/s is the cores over the sum, which
is what the ratios against the bare hop are made of.

The decomposition (issue 18): the first engine's full stack is also run as
`full-<engine>-mem` (in-memory stores, no Langfuse), `full-<engine>-mem-lf` (in-memory stores,
Langfuse export) and `full-<engine>-redis` (Redis stores, no Langfuse), next to `full-<engine>`
(Redis and Langfuse) and the bare hop.

Environment: BENCH_DURATION (seconds per run, default 1.5), BENCH_ROUNDS (default 3),
BENCH_ENGINES (default "hyper pingora"), BENCH_STREAMS (default 1000), BENCH_DECOMPOSE (default
1; 0 skips the decomposition targets), BENCH_OUT (JSON path, default docs/bench-result.json),
BENCH_DOC (markdown to update, default docs/performance.md; empty: do not write).
"""

import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
DURATION = float(os.environ.get("BENCH_DURATION", "1.5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ENGINES = os.environ.get("BENCH_ENGINES", "hyper pingora").split()
STREAMS = int(os.environ.get("BENCH_STREAMS", "1000"))
DECOMPOSE = os.environ.get("BENCH_DECOMPOSE", "1") != "0"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "docs" / "bench-result.json"))
DOC = os.environ.get("BENCH_DOC", str(ROOT / "docs" / "performance.md"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

METADATA_PATH = "/rollout_id/bench/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1/chat/completions"
PLAIN_PATH = "/v1/chat/completions"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
    {"role": "user", "content": "Summarise why a gateway in front of an LLM must add next to no latency."},
]
JSON_BODY = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 64})
SSE_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 64, "stream": True,
     "stream_options": {"include_usage": True}}
)

# (name, concurrency, body, path, whether the plain route is meant)
SCENARIOS = [
    ("json c=1 metadata", 1, JSON_BODY, METADATA_PATH),
    ("json c=1 plain", 1, JSON_BODY, PLAIN_PATH),
    ("json c=32", 32, JSON_BODY, METADATA_PATH),
    ("json c=256", 256, JSON_BODY, METADATA_PATH),
    ("json c=1024", 1024, JSON_BODY, METADATA_PATH),
    ("sse c=1", 1, SSE_BODY, METADATA_PATH),
    ("sse c=32", 32, SSE_BODY, METADATA_PATH),
    ("sse c=256", 256, SSE_BODY, METADATA_PATH),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench: {what} exited with {proc.returncode} (see its log in {LOGS})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: {what} did not listen on {port} within {timeout}s")


LOGS = Path(tempfile.mkdtemp(prefix="llmgate-bench-"))
PROCS = []


def start(what, argv, port, env=None):
    log = open(LOGS / f"{what}.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    PROCS.append(proc)
    wait_port(port, proc, what)
    return proc


def stop_all():
    for proc in PROCS:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in PROCS:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


HELPERS = ("redis", "langfuse", "mock", "oha")


def machine_cpu(proxy, helpers):
    """CPU seconds so far of the proxy, each helper process and the finished load generators."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # only oha is ever waited for
    return {"proxy": cpu_seconds(proxy.pid), **{name: cpu_seconds(p.pid) for name, p in helpers.items()},
            "oha": children.ru_utime + children.ru_stime}


def status_kib(pid, key):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid):
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def oha(url, concurrency, body, seconds, extra_headers=()):
    argv = ["oha", "-z", f"{seconds}s", "-c", str(concurrency), "--no-tui", "--output-format", "json",
            "-m", "POST", "-H", "content-type: application/json", "-d", body]
    for header in extra_headers:
        argv += ["-H", header]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    statuses = {int(k): v for k, v in (data.get("statusCodeDistribution") or {}).items()}
    # A run ends at its deadline: the requests in flight then are cut by oha itself, not failed.
    errors = {k: v for k, v in (data.get("errorDistribution") or {}).items() if "deadline" not in k}
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {
        "rps": ok / data["summary"]["total"],
        "p50_ms": data["latencyPercentiles"]["p50"] * 1e3,
        "p99_ms": data["latencyPercentiles"]["p99"] * 1e3,
        "ttfb_p50_ms": (data.get("firstBytePercentiles") or {}).get("p50", 0) * 1e3,
        "ttfb_p99_ms": (data.get("firstBytePercentiles") or {}).get("p99", 0) * 1e3,
        "ok": ok,
        "failed": sum(v for k, v in statuses.items() if not 200 <= k < 300) + sum(errors.values()),
        "errors": errors,
        "statuses": statuses,
    }


def median_of(runs, key):
    return statistics.median(run[key] for run in runs)


def main():
    ulimit_note = ""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 65536)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as error:
        ulimit_note = f" (could not raise the open-file limit: {error})"

    llmgate = str(BIN / "llmgate")
    workdir = Path(tempfile.mkdtemp(prefix="llmgate-bench-run-"))
    mock_port, redis_port, langfuse_port = free_port(), free_port(), free_port()
    mock = start("mock", [llmgate, "mock-upstream", "--port", str(mock_port)], mock_port)
    redis = start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(workdir)], redis_port)
    langfuse = start("langfuse", [str(BIN / "langfuse-stand-in"), "--port", str(langfuse_port),
                                  "--project", "bench:pk-lf-bench:sk-lf-bench"], langfuse_port)
    helpers = {"redis": redis, "langfuse": langfuse, "mock": mock}
    secrets = workdir / "secrets.yaml"
    secrets.write_text("langfuse_keys:\n  bench: {public_key: pk-lf-bench, secret_key: sk-lf-bench}\n"
                       "default_project_id: bench\n")
    generous = "{rpm: 1000000000, tpm: 1000000000000, rpd: null}"
    models = "".join(
        f"  - {{name: {name}, upstream: mock, context_window: 128000, max_output_tokens: 16384, "
        f"limits: {generous}, pricing: {{input_per_1m: {price_in}, output_per_1m: {price_out}}}, "
        f"fallbacks: [{fallback}]}}\n"
        for name, price_in, price_out, fallback in [("gpt-4o-mini", 0.15, 0.6, "gpt-4o"), ("gpt-4o", 2.5, 10, "gpt-4o-mini")]
    )
    mock_url = f"http://127.0.0.1:{mock_port}/v1"

    def full_config(name, engine, port, with_redis, with_langfuse):
        config = workdir / f"{name}.yaml"
        text = (f'listen: "127.0.0.1:{port}"\nrequest_timeout_secs: 30\nengine: {engine}\n'
                f'upstreams:\n  mock: {{url: "{mock_url}", mode: openai}}\ndefault_upstream: mock\n'
                f"models:\n{models}rate_limit: {{max_wait_seconds: 0}}\n")
        if with_redis:
            text += f'redis: {{url: "redis://127.0.0.1:{redis_port}"}}\n'
        if with_langfuse:
            # The exporter's defaults: what keeps up is the product, not a tuned queue.
            text += (f'langfuse:\n  host: "http://127.0.0.1:{langfuse_port}"\n  secrets_path: "{secrets}"\n'
                     f"  emit: all\n  export: {{batch_delay_ms: 200}}\n")
        config.write_text(text)
        return config

    targets = {}  # name -> (port, proc)
    uses_redis, uses_langfuse = set(), set()
    for engine in ENGINES:
        port = free_port()
        proc = start(f"bare-{engine}", [llmgate, "bare-proxy", "--engine", engine], port,
                     {"UPSTREAM_URL": mock_url, "PORT": str(port), "HOST": "127.0.0.1", "REQUEST_TIMEOUT": "30"})
        targets[f"bare-{engine}"] = (port, proc)
    variants = [("", True, True)]
    for i, engine in enumerate(ENGINES):
        parts = variants + ([("-mem", False, False), ("-mem-lf", False, True), ("-redis", True, False)]
                            if DECOMPOSE and i == 0 else [])
        for suffix, with_redis, with_langfuse in parts:
            name, port = f"full-{engine}{suffix}", free_port()
            config = full_config(name, engine, port, with_redis, with_langfuse)
            targets[name] = (port, start(name, [llmgate, "serve", "--config", str(config)], port))
            if with_redis:
                uses_redis.add(name)
            if with_langfuse:
                uses_langfuse.add(name)

    print(f"bench: {len(targets)} proxies, {len(SCENARIOS)} scenarios, {ROUNDS} rounds of {DURATION:g}s; "
          f"logs in {LOGS}{ulimit_note}", flush=True)
    for name, (port, _) in targets.items():  # warm up connections, tokenizers, Redis scripts
        oha(f"http://127.0.0.1:{port}{METADATA_PATH}", 8, JSON_BODY, 0.5)

    results = {}
    # The mock alone, for reference: what the loopback and the load generator cost.
    for scenario, concurrency, body, path in [sc for sc in SCENARIOS if sc[0] in ("json c=1 metadata", "sse c=1")]:
        runs = [oha(f"http://127.0.0.1:{mock_port}{path}", concurrency, body, DURATION) for _ in range(ROUNDS)]
        results.setdefault(scenario, {})["mock"] = summarise(runs, None)
    for scenario, concurrency, body, path in SCENARIOS:
        runs = {name: [] for name in targets}
        cpu = {name: dict.fromkeys(("proxy", *HELPERS), 0.0) for name in targets}
        for _ in range(ROUNDS):
            for name, (port, proc) in targets.items():
                route = PLAIN_PATH if name.startswith("bare") else path
                before = machine_cpu(proc, helpers)
                run = oha(f"http://127.0.0.1:{port}{route}", concurrency, body, DURATION)
                if name in uses_langfuse:
                    time.sleep(0.5)  # the exporter's last batch of this run (200 ms delay), on this run's account
                for part, seconds in machine_cpu(proc, helpers).items():
                    cpu[name][part] += seconds - before[part]
                runs[name].append(run)
        for name in targets:
            ok = sum(run["ok"] for run in runs[name])
            results.setdefault(scenario, {})[name] = summarise(runs[name], cpu[name]["proxy"] * 1e3 / ok if ok else None)
            results[scenario][name]["rss_mib"] = status_kib(targets[name][1].pid, "VmRSS") / 1024
            if ok:
                # Every process's CPU per completed request (µs); Redis's counts for every target
                # (it runs on the same cores), `redis_cpu_us_per_request` only where the target uses it.
                results[scenario][name]["cpu_us_per_request"] = {
                    part: seconds * 1e6 / ok for part, seconds in cpu[name].items()}
            if name in uses_redis and ok:
                results[scenario][name]["redis_cpu_us_per_request"] = cpu[name]["redis"] * 1e6 / ok
        print_scenario(scenario, results[scenario])

    streams = {}
    for name, (port, proc) in targets.items():
        if name not in [f"full-{engine}" for engine in ENGINES]:
            continue
        reset = reset_peak_rss(proc.pid)
        run = oha(f"http://127.0.0.1:{port}{METADATA_PATH}", STREAMS, SSE_BODY, 8,
                  ["x-mock-chunks: 20", "x-mock-chunk-delay-ms: 100"])
        streams[name] = {
            "concurrent_streams": STREAMS,
            "completed": run["ok"],
            "failed": run["failed"],
            "errors": run["errors"],
            "peak_rss_mib": status_kib(proc.pid, "VmHWM") / 1024 if reset else None,
            "rss_after_mib": status_kib(proc.pid, "VmRSS") / 1024,
        }
        print(f"{STREAMS} open streams on {name}: {streams[name]}", flush=True)
    peaks = {name: status_kib(proc.pid, "VmHWM") / 1024 for name, (_, proc) in targets.items()}
    time.sleep(1.5)  # the exporters' last batch
    langfuse_spans = last_spans(LOGS / "langfuse.log")
    # What the background work kept up with: insertion records and Langfuse spans by outcome.
    background = {name: counters(port) for name, (port, _) in targets.items() if name.startswith("full")}
    for name, values in background.items():
        print(f"{name}: {values}")
    stop_all()

    budget = check_budget(results, streams, background)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "settings": {"duration_s": DURATION, "rounds": ROUNDS, "engines": ENGINES, "baseline": "bare-hyper"},
        "results": results,
        "open_streams": streams,
        "peak_rss_mib": peaks,
        "langfuse_spans_received": langfuse_spans,
        "background": background,
        "budget": budget,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {OUT}")
    print("\nbudget:")
    for line in budget:
        print(f"  {'PASS' if line['pass'] else 'MISS'}  {line['what']}: {line['measured']} (budget {line['budget']})")
    if DOC:
        write_doc(Path(DOC), report)
        print(f"updated {DOC}")
    shutil.rmtree(workdir, ignore_errors=True)


def summarise(runs, cpu_ms_per_request):
    return {
        "rps": median_of(runs, "rps"),
        "p50_ms": median_of(runs, "p50_ms"),
        "p99_ms": median_of(runs, "p99_ms"),
        "ttfb_p50_ms": median_of(runs, "ttfb_p50_ms"),
        "ttfb_p99_ms": median_of(runs, "ttfb_p99_ms"),
        "requests": sum(run["ok"] for run in runs),
        "failed": sum(run["failed"] for run in runs),
        "cpu_ms_per_request": cpu_ms_per_request,
    }


def print_scenario(scenario, by_target):
    print(f"\n{scenario}")
    print(f"  {'target':<20}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}{'ttfb p50':>10}{'+p50 ms':>9}{'cpu ms/req':>12}"
          f"{'redis us/req':>14}{'failed':>8}")
    base = by_target.get("bare-hyper")
    for name, r in by_target.items():
        added = f"{r['p50_ms'] - base['p50_ms']:+.3f}" if base and name != "mock" else ""
        cpu = f"{r['cpu_ms_per_request']:.3f}" if r.get("cpu_ms_per_request") is not None else ""
        redis = f"{r['redis_cpu_us_per_request']:.1f}" if "redis_cpu_us_per_request" in r else ""
        print(f"  {name:<20}{r['rps']:>10.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['ttfb_p50_ms']:>10.3f}"
              f"{added:>9}{cpu:>12}{redis:>14}{r['failed']:>8}", flush=True)


def check_budget(results, streams, background):
    lines = []

    def add(what, measured, budget, ok):
        lines.append({"what": what, "measured": measured, "budget": budget, "pass": bool(ok)})

    for engine in ENGINES:
        full, bare = f"full-{engine}", "bare-hyper"
        meta, plain = results["json c=1 metadata"], results["json c=1 plain"]
        if bare not in meta or full not in meta:
            continue
        d50 = meta[full]["p50_ms"] - meta[bare]["p50_ms"]
        d99 = meta[full]["p99_ms"] - meta[bare]["p99_ms"]
        add(f"{engine}: c=1 JSON metadata route, added p50", f"{d50:+.3f} ms", "≤ 0.2 ms", d50 <= 0.2)
        add(f"{engine}: c=1 JSON metadata route, added p99", f"{d99:+.3f} ms", "≤ 0.4 ms", d99 <= 0.4)
        dp = plain[full]["p50_ms"] - plain[bare]["p50_ms"]
        add(f"{engine}: c=1 JSON plain route, added p50", f"{dp:+.3f} ms", "≤ 0.1 ms", dp <= 0.1)
        c32 = results["json c=32"]
        ratio = c32[full]["rps"] / c32[bare]["rps"]
        add(f"{engine}: c=32 JSON, RPS vs bare hop", f"{ratio:.2f}×", "≥ 0.7×", ratio >= 0.7)
        sse = results["sse c=1"]
        dt = sse[full]["ttfb_p50_ms"] - sse[bare]["ttfb_p50_ms"]
        add(f"{engine}: SSE c=1, added time to first byte (p50)", f"{dt:+.3f} ms", "≤ 0.2 ms", dt <= 0.2)
        # Issue 18: Redis CPU per request, the Redis + Langfuse stack against the bare hop (c=32 on a
        # machine with fewer than 8 cores, c=256 on one with more), nothing failed or lost.
        redis_us = max(results[sc][full].get("redis_cpu_us_per_request", 0) for sc in ("json c=32", "json c=256"))
        add(f"{engine}: Redis CPU per request (JSON c=32 and c=256, the larger)", f"{redis_us:.1f} µs", "≤ 5 µs",
            redis_us <= 5)
        loaded = "json c=256" if (os.cpu_count() or 1) >= 8 else "json c=32"
        ratio = results[loaded][full]["rps"] / results[loaded][bare]["rps"]
        add(f"{engine}: {loaded.split()[1]} JSON, Redis + Langfuse stack vs bare hop", f"{ratio:.2f}×", "≥ 0.5×",
            ratio >= 0.5)
        failed = sum(r[full]["failed"] for r in results.values() if full in r)
        values = background.get(full, {})
        # A failed record attempt is retried (not lost); a failed span export is given up (lost).
        lost = sum(v for k, v in values.items()
                   if 'outcome="dropped"' in k or (k.startswith("langfuse_spans") and 'outcome="failed"' in k))
        add(f"{engine}: failed requests, spans dropped or failed, records dropped or failed (every concurrency)",
            f"{failed} failed, {lost} lost", "0", failed == 0 and lost == 0)
        s = streams.get(full)
        if s:
            rss = s["peak_rss_mib"] if s["peak_rss_mib"] is not None else s["rss_after_mib"]
            add(f"{engine}: {s['concurrent_streams']} open streams, peak RSS and errors",
                f"{rss:.0f} MiB, {s['failed']} failed", "≤ 150 MB, 0 errors", rss * 1.048576 <= 150 and s["failed"] == 0)
    return lines


def counters(port):
    wanted = ("llmgate_insertion_records_total", "llmgate_insertion_writes_total", "llmgate_langfuse_spans_total")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            values[name.replace("llmgate_", "").replace("_total", "")] = int(float(value))
    return values


def last_spans(log):
    spans = 0
    for line in log.read_text().splitlines():
        if line.startswith("exports="):
            spans = int(line.split("spans=")[1])
    return spans


def machine():
    cpus = os.cpu_count()
    load = os.getloadavg()
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": cpus, "cpu": model, "load_avg_at_end": [round(x, 2) for x in load]}


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_doc(path, report):
    rows = []
    for scenario, by_target in report["results"].items():
        base = by_target.get("bare-hyper")
        for name, r in by_target.items():
            added = f"{r['p50_ms'] - base['p50_ms']:+.3f} / {r['p99_ms'] - base['p99_ms']:+.3f}" if base and name != "mock" else ""
            cpu = f"{r['cpu_ms_per_request']:.3f}" if r.get("cpu_ms_per_request") is not None else ""
            rss = f"{r['rss_mib']:.0f}" if "rss_mib" in r else ""
            rows.append(f"| {scenario} | {name} | {r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                        f"{r['ttfb_p50_ms']:.3f} | {added} | {cpu} | {rss} | {r['failed']} |")
    budget = [f"| {'✓' if b['pass'] else '✗'} | {b['what']} | {b['measured']} | {b['budget']} |" for b in report["budget"]]
    decomposition = []
    for scenario in ("json c=32", "json c=256", "json c=1024"):
        by_target = report["results"].get(scenario, {})
        base = by_target.get("bare-hyper")
        for name, r in by_target.items():
            if not base or name.startswith("bare-pingora") or name == "full-pingora":
                continue
            parts = r.get("cpu_us_per_request", {})
            cpu = f"{r['cpu_ms_per_request']:.3f}" if r.get("cpu_ms_per_request") is not None else ""
            redis = f"{r['redis_cpu_us_per_request']:.1f}" if "redis_cpu_us_per_request" in r else "–"
            stand_in = f"{parts['langfuse']:.1f}" if parts.get("langfuse", 0) >= 0.5 else "–"
            driver = f"{parts.get('mock', 0) + parts.get('oha', 0):.1f}" if parts else ""
            total = f"{sum(parts.values()) / 1e3:.3f}" if parts else ""
            decomposition.append(f"| {scenario} | {name} | {r['rps']:,.0f} | {r['rps'] / base['rps']:.2f} | "
                                 f"{r['p50_ms']:.2f} | {cpu} | {redis} | {stand_in} | {driver} | {total} |")
    streams = [f"| {name} | {s['concurrent_streams']} | {s['completed']} | {s['failed']} | "
               f"{s['peak_rss_mib'] if s['peak_rss_mib'] is None else round(s['peak_rss_mib'])} |"
               for name, s in report["open_streams"].items()]
    m = report["machine"]
    block = "\n".join([
        BEGIN,
        f"Last run: {report['date']}, {m['cpus']} CPUs ({m['cpu']}), load average at the end "
        f"{m['load_avg_at_end']}; {report['settings']['rounds']} interleaved rounds of "
        f"{report['settings']['duration_s']:g} s per target and scenario, medians shown. Baseline: the bare "
        f"hyper hop. Langfuse spans received by the stand-in: {report['langfuse_spans_received']:,}. "
        f"Background work by outcome (from `/metrics`): "
        + "; ".join(f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in values.items() if v)
                    for name, values in report["background"].items()) + ". "
        f"Machine-readable: `docs/bench-result.json`.",
        "",
        "| budget | what | measured | budget |",
        "|---|---|---|---|",
        *budget,
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | TTFB p50 ms | added p50 / p99 ms | CPU ms/req | RSS MiB | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| open streams | concurrent | completed | failed | peak RSS MiB |",
        "|---|---|---|---|---|",
        *streams,
        "",
        "Decomposition (hyper engine): `-mem` in-memory stores, no Langfuse; `-mem-lf` in-memory stores "
        "and Langfuse export; `-redis` Redis stores, no Langfuse; `full-hyper` Redis and Langfuse. "
        "CPU per completed request of every process on the machine: the proxy, Redis, the Langfuse "
        "stand-in, the mock upstream with the load generator (oha), and all of them together.",
        "",
        "| scenario | target | req/s | × bare hop | p50 ms | proxy CPU ms/req | Redis CPU µs/req | "
        "stand-in CPU µs/req | mock + oha CPU µs/req | all CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *decomposition,
        END,
    ])
    text = path.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## End-to-end load benchmark (last run)\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
