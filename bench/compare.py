#!/usr/bin/env python3
"""Side-by-side benchmark of kingdom-edge, nginx and HAProxy in front of one nginx origin, and
of cache hits against nginx's proxy_cache, HAProxy's cache and Varnish.

Run through bench/compare.sh, which installs the tools first. Every process listens on
127.0.0.1, every load run is bounded in time, and only the processes started here are
stopped, by PID. See bench/README.md for how to read the output.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXIES = ["nginx", "haproxy", "kingdom-edge"]
CACHES = ["nginx", "haproxy", "varnish", "kingdom-edge"]
LABELS = {"nginx": "nginx", "haproxy": "HAProxy", "varnish": "Varnish", "kingdom-edge": "kingdom-edge"}
# What the origin answers at CACHED: the same body, storable for an hour by a shared cache.
CACHED = "/cached"
BODY = "hello from the origin\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, log=None, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            output = Path(log).read_text() if log else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline}s")


def http_get(port, path="/"):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def process_tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            continue
    return total / CLK_TCK


def pss_bytes(pids):
    """Proportional set size, summed: shared pages are not counted once per process."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen = None
    extra: dict = field(default_factory=dict)

    def pids(self):
        return process_tree(self.proc.pid)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.name == "kingdom-edge" else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    def __init__(self, args, work):
        self.args = args
        self.work = Path(work)
        self.servers = []
        self.tools = Path(args.tools)
        self.cert, self.key, self.pem = self.make_certificate()

    def make_certificate(self):
        """A throwaway ECDSA certificate for the TLS listeners (HAProxy wants cert and key in one file)."""
        cert, key, pem = self.work / "cert.pem", self.work / "key.pem", self.work / "haproxy.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=bench"],
            capture_output=True, check=True,
        )
        pem.write_text(cert.read_text() + key.read_text())
        return cert, key, pem

    def spawn(self, name, argv, port, log):
        path = self.work / f"{log}.out"
        with open(path, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = Server(name, port, proc)
        self.servers.append(server)
        wait_port(port, proc, path)
        return server

    def stop_all(self):
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    # --- the three proxies and the origin -------------------------------------------------

    def start_origin(self, ports):
        conf = self.work / "origin.conf"
        listens = "\n".join(f"    listen 127.0.0.1:{p};" for p in ports)
        conf.write_text(f"""
worker_processes 2;
daemon off;
pid {self.work}/origin.pid;
error_log {self.work}/origin-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 9000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {self.work}/tmp-origin;
  proxy_temp_path {self.work}/tmp-origin;
  server {{
{listens}
    location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}
    location = {CACHED} {{
      default_type text/plain;
      add_header Cache-Control "public, max-age=3600";
      return 200 "{BODY.strip()}\\n";
    }}
  }}
}}
""")
        (self.work / "tmp-origin").mkdir(exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        return self.spawn("origin", ["nginx", "-c", str(conf), "-p", str(self.work)], ports[0], "origin")

    def start_nginx(self, threads, log, origins, cache=False):
        port, tls_port = free_port(), free_port()
        cache_path = (f"proxy_cache_path {self.work}/nginx-cache keys_zone=bench:10m max_size=256m inactive=1h;"
                      if cache else "")
        cache_use = "proxy_cache bench;" if cache else ""
        if cache:
            # nginx's workers (not root) write the cache files: let them reach their folder.
            (self.work / "nginx-cache").mkdir(exist_ok=True)
            os.chmod(self.work, 0o711)
            os.chmod(self.work / "nginx-cache", 0o777)
        conf = self.work / f"nginx-{threads}-{log}{'-cache' if cache else ''}.conf"
        access = f"access_log {self.work}/nginx-access.log;" if log else "access_log off;"
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in origins)
        conf.write_text(f"""
worker_processes {threads};
daemon off;
pid {self.work}/nginx-{threads}-{log}.pid;
error_log {self.work}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 9000; }}
http {{
  {access}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {self.work}/tmp-nginx;
  proxy_temp_path {self.work}/tmp-nginx;
  {cache_path}
  upstream origin {{
{servers}
    keepalive 256;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      {cache_use}
    }}
  }}
}}
""")
        (self.work / "tmp-nginx").mkdir(exist_ok=True)
        server = self.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(self.work)], port,
                            f"nginx-{threads}-{log}{'-cache' if cache else ''}")
        server.extra["tls"] = tls_port
        return server

    def start_haproxy(self, threads, log, origins, cache=False):
        port, tls_port = free_port(), free_port()
        conf = self.work / f"haproxy-{threads}-{log}{'-cache' if cache else ''}.cfg"
        # HAProxy's cache: in memory, total-max-size in MiB.
        cache_section = "cache bench\n  total-max-size 256\n  max-age 3600\n" if cache else ""
        cache_use = ("  http-request cache-use bench\n  http-response cache-store bench\n"
                     if cache else "")
        servers = "\n".join(f"  server o{i} 127.0.0.1:{p}" for i, p in enumerate(origins))
        logging = ("  log stdout format raw local0\n", "  log global\n  option httplog\n") if log else ("", "")
        conf.write_text(f"""
global
  nbthread {threads}
  # Each connection needs two descriptors; stay under a 20,000 hard limit.
  maxconn 9000
{logging[0]}
defaults
  mode http
{logging[1]}  timeout connect 1s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
  option http-keep-alive
  http-reuse always

{cache_section}
frontend bench
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{tls_port} ssl crt {self.pem}
  default_backend origin

backend origin
  balance roundrobin
{cache_use}{servers}
""")
        server = self.spawn("haproxy", ["haproxy", "-db", "-f", str(conf)], port,
                            f"haproxy-{threads}-{log}{'-cache' if cache else ''}")
        server.extra["tls"] = tls_port
        return server

    def start_kingdom(self, threads, log, origins, cache=False):
        port, tls_port, admin = free_port(), free_port(), free_port()
        conf = self.work / f"kingdom-{threads}-{log}{'-cache' if cache else ''}.yaml"
        cached_route = (f"  - {{ name: cached, match: {{ path_prefix: {CACHED} }}, pool: origin, cache: {{}} }}\n"
                        if cache else "")
        access = f"{self.work}/kingdom-access.log" if log else "off"
        backends = ", ".join(f"{{ address: 127.0.0.1:{p} }}" for p in origins)
        conf.write_text(f"""
server: {{ threads: {threads}, shutdown_timeout: 5s }}
listeners:
  - {{ name: bench, address: 127.0.0.1:{port} }}
  - name: bench-tls
    address: 127.0.0.1:{tls_port}
    tls: {{ certificates: [{{ cert: {self.cert}, key: {self.key} }}] }}
admin: {{ address: 127.0.0.1:{admin} }}
pools:
  origin:
    balance: weighted_round_robin
    backends: [{backends}]
cache: {{ memory: 256MiB }}
routes:
{cached_route}  - {{ name: bench, match: {{ path_prefix: / }}, pool: origin }}
access_log: {{ output: {access} }}
""")
        server = self.spawn(
            "kingdom-edge",
            [str(self.args.kingdom), "run", "-c", str(conf)],
            port,
            f"kingdom-{threads}-{log}{'-cache' if cache else ''}",
        )
        server.extra["admin"] = admin
        server.extra["tls"] = tls_port
        return server

    def start_varnish(self, threads, log, origins, cache=True):
        """Varnish, the reference memory cache: one backend (the first origin), malloc storage."""
        port = free_port()
        workdir = self.work / "varnish"
        workdir.mkdir(exist_ok=True)
        argv = ["varnishd", "-F", "-a", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{origins[0]}",
                "-s", "malloc,256m", "-n", str(workdir), "-j", "none", "-p", f"thread_pools={threads}"]
        return self.spawn("varnish", argv, port, f"varnish-{threads}")

    def start(self, name, threads, log, origins, cache=False):
        return {
            "nginx": self.start_nginx,
            "haproxy": self.start_haproxy,
            "varnish": self.start_varnish,
            "kingdom-edge": self.start_kingdom,
        }[name](threads, log, origins, cache)

    # --- measurements ----------------------------------------------------------------------

    def throughput(self, server, measure_cpu=True, path="/"):
        """Closed loop: wrk, 50 connections. Returns (req/s, µs of proxy CPU per request)."""
        pids = server.pids() if measure_cpu else []
        before = cpu_seconds(pids)
        out = subprocess.run(
            ["wrk", "-t2", "-c50", f"-d{self.args.duration}s", f"http://127.0.0.1:{server.port}{path}"],
            capture_output=True, text=True, timeout=self.args.duration + 30, check=True,
        ).stdout
        after = cpu_seconds(pids)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if errors and int(errors.group(1)) > requests // 100:
            raise RuntimeError(f"{server.name}: {errors.group(1)} error responses\n{out}")
        cpu_us = (after - before) * 1e6 / requests if measure_cpu and requests else None
        return rps, cpu_us

    def latency(self, server, rate):
        """Open loop at a fixed rate, corrected for coordinated omission. Returns ms p50/p99/p99.9."""
        out = subprocess.run(
            [str(self.tools / "bin" / "oha"), "--no-tui", "--output-format", "json",
             "-z", f"{self.args.duration}s", "-q", str(rate), "--latency-correction",
             "-c", "50", f"http://127.0.0.1:{server.port}/"],
            capture_output=True, text=True, timeout=self.args.duration + 60, check=True,
        ).stdout
        data = json.loads(out)
        pct = data["latencyPercentiles"]
        success = data["summary"].get("successRate", 1.0)
        if success < 0.99:
            raise RuntimeError(f"{server.name}: success rate {success} at {rate} req/s")
        return pct["p50"] * 1e3, pct["p99"] * 1e3, pct["p99.9"] * 1e3

    def cache_hits(self, threads, origins):
        """Hits on one stored URL, every cache interleaved; the rows for the cache table."""
        tag = f"{threads} thread{'s' if threads > 1 else ''}, log off"
        servers = {c: self.start(c, threads, False, origins, cache=True) for c in CACHES}
        for s in servers.values():
            for _ in range(3):  # the first stores it; the next ones must be hits
                assert BODY.strip() in http_get(s.port, CACHED), f"{s.name} does not proxy {CACHED}"
        rps = {c: [] for c in CACHES}
        cpu = {c: [] for c in CACHES}
        for r in range(self.args.rounds):
            for c in CACHES:
                value, us = self.throughput(servers[c], path=CACHED)
                rps[c].append(value)
                cpu[c].append(us)
                print(f"[cache hits, {tag}] round {r + 1}: {c} {value:,.0f} req/s, {us:.1f} µs CPU/req",
                      file=sys.stderr)
        for s in servers.values():
            s.stop()
            self.servers.remove(s)
        return [
            (f"cache hits, req/s ({tag})", rps, lambda v: f"{v:,.0f}", {}),
            (f"CPU per cache hit, µs ({tag})", cpu, lambda v: f"{v:.1f}", {}),
        ]

    def memory(self, server, n, tls=False):
        """PSS at rest, then PSS per idle keep-alive connection that has served one request."""
        for _ in range(10):
            http_get(server.port)
        time.sleep(1)  # let allocator and kernel accounting settle after startup
        rest = pss_bytes(server.pids())
        port = server.extra["tls"] if tls else server.port
        held = asyncio.run(hold_idle_connections(port, n, lambda: pss_bytes(server.pids()), tls))
        return rest, (held - rest) / n


async def hold_idle_connections(port, n, measure, tls=False):
    """Opens n connections (TLS: HTTP/1.1 over TLS 1.3), completes one request on each,
    measures while all are idle."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    conns = []
    sem = asyncio.Semaphore(500)
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            conns.append(writer)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=300)
    await asyncio.sleep(1)
    value = measure()
    for writer in conns:
        writer.close()
    await asyncio.sleep(0.5)
    return value


# --- statistics and the table -------------------------------------------------------------

def summary(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return None, ""
    med = statistics.median(values)
    if len(values) == 1:
        return med, fmt(med)
    return med, f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def ratio(value, base):
    if value is None or not base:
        return ""
    return f" ×{value / base:.2f}"


def render(rows, columns):
    """rows: (label, {column: [values]}, fmt, lower_is_better)"""
    head = "| measurement | " + " | ".join(LABELS[c] for c in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    for label, values, fmt, note in rows:
        base, _ = summary(values.get("nginx", []), fmt)
        cells = []
        for c in columns:
            med, text = summary(values.get(c, []), fmt)
            cells.append(text + ratio(med, base) if text else note.get(c, "—"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kingdom", required=True, help="path to the kingdom-edge binary")
    parser.add_argument("--tools", required=True, help="where oha is installed (prefix)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--idle", type=int, default=5000, help="idle keep-alive connections")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", help="also write the report here")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only memory (at rest, idle plain and TLS connections), log off")
    parser.add_argument("--cache-only", action="store_true",
                        help="measure only cache hits (nginx, HAProxy, Varnish, kingdom-edge)")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the `finally` below stops every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    threads_list = [int(t) for t in args.threads.split(",")]

    with tempfile.TemporaryDirectory(prefix="kingdom-bench-") as work:
        bench = Bench(args, work)
        rows, cache_rows = [], []
        try:
            origins = [free_port(), free_port()]
            origin = bench.start_origin(origins)
            assert BODY.strip() in http_get(origins[0])
            direct = []
            for threads in ([] if args.cache_only else threads_list):
                for log in ((False,) if args.memory_only else (False, True)):
                    tag = f"{threads} thread{'s' if threads > 1 else ''}, log {'on' if log else 'off'}"
                    servers = {p: bench.start(p, threads, log, origins) for p in PROXIES}
                    for s in servers.values():
                        assert BODY.strip() in http_get(s.port), f"{s.name} does not proxy"
                    rps = {p: [] for p in PROXIES}
                    cpu = {p: [] for p in PROXIES}
                    for r in range(0 if args.memory_only else args.rounds):
                        for p in PROXIES:
                            value, us = bench.throughput(servers[p])
                            rps[p].append(value)
                            cpu[p].append(us)
                            print(f"[{tag}] round {r + 1}: {p} {value:,.0f} req/s, {us:.1f} µs CPU/req", file=sys.stderr)
                        if threads == threads_list[0] and not log:
                            value, _ = bench.throughput(origin, measure_cpu=False)
                            direct.append(value)
                    # Half the slowest proxy's throughput: a load all three can carry, so the
                    # percentiles compare latency rather than show one proxy's overload.
                    rate = 0 if args.memory_only else max(100, int(min(statistics.median(rps[p]) for p in PROXIES) * 0.5))
                    lat = {p: ([], [], []) for p in PROXIES}
                    for r in range(0 if args.memory_only else args.rounds):
                        for p in PROXIES:
                            p50, p99, p999 = bench.latency(servers[p], rate)
                            for i, v in enumerate((p50, p99, p999)):
                                lat[p][i].append(v)
                            print(f"[{tag}] round {r + 1}: {p} at {rate} req/s p50 {p50:.2f} p99 {p99:.2f} p99.9 {p999:.2f} ms", file=sys.stderr)
                    if not args.memory_only:
                        rows.append((f"throughput, req/s ({tag})", rps, lambda v: f"{v:,.0f}", {}))
                        rows.append((f"CPU per request, µs ({tag})", cpu, lambda v: f"{v:.1f}", {}))
                        for i, name in enumerate(("p50", "p99", "p99.9")):
                            rows.append((f"latency {name} at {rate:,} req/s, ms ({tag})",
                                         {p: lat[p][i] for p in PROXIES}, lambda v: f"{v:.2f}", {}))
                    if not log:
                        mem_rest = {p: [] for p in PROXIES}
                        mem_conn = {p: [] for p in PROXIES}
                        mem_tls = {p: [] for p in PROXIES}
                        for p in PROXIES:
                            rest, per_conn = bench.memory(servers[p], args.idle)
                            mem_rest[p].append(rest / 2**20)
                            mem_conn[p].append(per_conn / 1024)
                            print(f"[{tag}] {p}: PSS at rest {rest / 2**20:.1f} MiB, {per_conn / 1024:.2f} KiB per idle connection", file=sys.stderr)
                            _, per_tls = bench.memory(servers[p], args.idle, tls=True)
                            mem_tls[p].append(per_tls / 1024)
                            print(f"[{tag}] {p}: {per_tls / 1024:.2f} KiB per idle TLS connection", file=sys.stderr)
                        rows.append((f"memory at rest, MiB PSS ({tag})", mem_rest, lambda v: f"{v:.1f}", {}))
                        rows.append((f"memory per idle keep-alive connection, KiB ({tag}, {args.idle:,} connections)",
                                     mem_conn, lambda v: f"{v:.2f}", {}))
                        rows.append((f"memory per idle TLS keep-alive connection, KiB ({tag}, {args.idle:,} connections)",
                                     mem_tls, lambda v: f"{v:.2f}", {}))
                    for s in servers.values():
                        s.stop()
                        bench.servers.remove(s)
            if not args.memory_only:
                cache_rows.extend(bench.cache_hits(threads_list[0], origins))
        finally:
            bench.stop_all()

    cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), "unknown CPU")
    versions = {
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
        "kingdom-edge": subprocess.run([str(args.kingdom), "--version"], capture_output=True, text=True).stdout.strip(),
        "varnish": (subprocess.run(["varnishd", "-V"], capture_output=True, text=True).stderr.strip().splitlines()
                    or ["varnish: not installed"])[0],
    }
    report = "\n".join([
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores ({cpu_model}), "
        f"{args.rounds} rounds of {args.duration}s per cell, proxies interleaved; "
        f"median (min–max) ×ratio to nginx.",
        f"Versions: {versions['nginx']}; {versions['haproxy']}; {versions['varnish']}; {versions['kingdom-edge']}.",
        "" if args.memory_only or args.cache_only else
        f"The same closed-loop load straight to the origin, with no proxy (the ceiling): "
        f"{summary(direct, lambda v: f'{v:,.0f}')[1]} req/s.",
        "",
        render(rows, ["nginx", "haproxy", "kingdom-edge"]) if rows else "",
        *(["", "Cache hits: one URL the origin marks `public, max-age=3600`, stored once, then the same "
           "closed-loop load; nginx's proxy_cache (on disk, in the page cache), HAProxy's memory "
           "cache, Varnish (malloc storage), kingdom-edge's memory cache.", "",
           render(cache_rows, CACHES)] if cache_rows else []),
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
