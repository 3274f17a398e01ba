#!/usr/bin/env python3
"""Admin API load: start-up time, idle RSS, and the time to create N services
and N routes (one route per service) through Kong-style POSTs.

    bench/admin-load.py [--bin target/release/gatehouse] [--services 10000]
                        [--database-url postgres://...] [--restart]

Starts `gatehouse standalone` on free loopback ports with a fresh prefix,
uses one keep-alive connection (as decK and curl loops do), and prints one
JSON document. With --restart it then stops the gateway, starts it again
on the same data and reports how long until the last route answers and the
RSS of that fresh process. Python 3 standard library only.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def wait_routed(proxy_port, path, limit):
    """Seconds until `path` is routed (anything but 404) through the proxy."""
    t = time.monotonic()
    while True:
        try:
            p = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=5)
            p.request("GET", path)
            if p.getresponse().status != 404:
                return time.monotonic() - t
        except OSError:
            pass
        if time.monotonic() - t > limit:
            sys.exit("%s never reached the proxy" % path)
        time.sleep(0.01)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/gatehouse")
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="hard limit for the load phase")
    ap.add_argument("--restart", action="store_true",
                    help="restart on the loaded data and measure the fresh process")
    args = ap.parse_args()

    prefix = tempfile.mkdtemp(prefix="gh-bench-")
    admin_port, proxy_port = free_port(), free_port()
    env = dict(os.environ,
               GATEHOUSE_PREFIX=prefix,
               GATEHOUSE_ADMIN_LISTEN="127.0.0.1:%d" % admin_port,
               GATEHOUSE_PROXY_LISTEN="127.0.0.1:%d" % proxy_port,
               GATEHOUSE_LOG_LEVEL="warn")
    if args.database_url:
        env["GATEHOUSE_DATABASE_URL"] = args.database_url
    t0 = time.monotonic()
    proc = subprocess.Popen([args.bin, "standalone"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(prefix, "log"), "w"))
    try:
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
                c.request("GET", "/status")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > 30 or proc.poll() is not None:
                sys.exit("gatehouse did not start")
            time.sleep(0.005)
        startup_s = time.monotonic() - t0
        time.sleep(1.0)
        idle_rss = rss_kib(proc.pid)

        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
        hdrs = {"Content-Type": "application/json"}
        t1 = time.monotonic()
        for i in range(args.services):
            name = "svc-%05d" % i
            conn.request("POST", "/services", json.dumps(
                {"name": name, "url": "http://127.0.0.1:9/%d" % i}), hdrs)
            r = conn.getresponse()
            body = r.read()
            if r.status != 201:
                sys.exit("POST /services -> %d %s" % (r.status, body[:200]))
            conn.request("POST", "/services/%s/routes" % name, json.dumps(
                {"name": "route-%05d" % i, "paths": ["/r/%05d" % i]}), hdrs)
            r = conn.getresponse()
            body = r.read()
            if r.status != 201:
                sys.exit("POST routes -> %d %s" % (r.status, body[:200]))
            if time.monotonic() - t1 > args.timeout:
                sys.exit("time limit hit after %d services" % i)
        load_s = time.monotonic() - t1

        # Propagation: the last route must answer through the proxy (its
        # upstream port 9 is closed, so a routed request gets 502, an
        # unrouted one 404).
        last = "/r/%05d" % (args.services - 1)
        propagation_s = wait_routed(proxy_port, last, 60)
        loaded_rss = rss_kib(proc.pid)
        restart = {}
        if args.restart:
            proc.terminate()
            proc.wait(30)
            t3 = time.monotonic()
            proc = subprocess.Popen([args.bin, "standalone"], env=env,
                                    stdout=subprocess.DEVNULL,
                                    stderr=open(os.path.join(prefix, "log2"), "w"))
            restart["restart_last_route_s"] = round(
                (time.monotonic() - t3) + wait_routed(proxy_port, last, 300), 2)
            time.sleep(1.0)
            restart["restart_rss_kib"] = rss_kib(proc.pid)
        print(json.dumps({
            "services": args.services,
            "routes": args.services,
            "startup_s": round(startup_s, 3),
            "idle_rss_kib": idle_rss,
            "create_s": round(load_s, 2),
            "writes_per_s": round(2 * args.services / load_s, 1),
            "last_route_propagation_s": round(propagation_s, 3),
            "rss_after_load_kib": loaded_rss,
            "database": "postgres" if args.database_url else "sqlite",
            **restart,
        }, indent=2))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
