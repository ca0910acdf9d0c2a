"""Load test of `python -m jaxfire.server` on loopback: a burst of streamed clients, then a soak.

    python scripts/load_test.py                          # 1000 clients at once, then 10,000 requests
    python scripts/load_test.py --clients 100 --requests 1000 --slots 8   # a quick look

It starts the server on the built-in model (CPU unless JAX finds an accelerator) on a free loopback
port, then:
1. burst: `--clients` streamed completions open their connections at the same moment; every third
   hangs up after its first chunk. Every request must be answered in full, refused with 429
   (beyond `--max-concurrent-requests`) or hung up by its client: no connection reset, no 5xx.
2. soak: `--requests` streamed completions, `--clients` at a time, the same third hanging up. The
   server's resident memory after the first 1,000 and at the end must differ by at most 10%.
3. After each phase the server's /metrics must show no request running or waiting and no KV-cache
   page in use (every slot and page free) within 30 s.
Prints the tallies and exits 1 if a check failed. `--deadline` bounds the whole run in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

HOST = "127.0.0.1"  # loopback only


async def stream_once(port: int, body: dict, hang_up: bool, timeout: float = 300.0) -> str:
    """One streamed completion over a fresh connection: "ok" (answered in full, ending in [DONE]),
    "hung-up" (we left after the first chunk), the HTTP status of a refusal, "reset", "refused" or
    "truncated" (the server closed before [DONE])."""
    data = json.dumps({**body, "stream": True}).encode()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except ConnectionRefusedError:
        return "refused"
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (HOST.encode(), len(data), data))
        await writer.drain()
        async with asyncio.timeout(timeout):
            status = int((await reader.readline()).split()[1])
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # headers
            if status != 200:
                await reader.read()
                return str(status)
            if hang_up:
                while b"data: " not in await reader.readline():
                    pass
                return "hung-up"
            rest = await reader.read()
            return "ok" if b"data: [DONE]" in rest else "truncated"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        writer.close()


async def run(port: int, count: int, at_once: int, body: dict, on_done=None) -> collections.Counter:
    """`count` streamed requests, `at_once` in flight (all `count` open together when they are equal);
    request i hangs up when i % 3 == 0. `on_done(done)` is called after each request."""
    tally: collections.Counter = collections.Counter()
    gate = asyncio.Semaphore(at_once)

    async def one(i: int) -> None:
        async with gate:
            tally[await stream_once(port, body, hang_up=i % 3 == 0)] += 1
            if on_done is not None:
                on_done(sum(tally.values()))

    await asyncio.gather(*(one(i) for i in range(count)))
    return tally


def idle(port: int, wait: float = 30.0) -> bool:
    """Whether the server's /metrics shows no request running or waiting and no KV-cache page held by
    one (the paged engine's usage gauge) within `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as resp:
            gauges = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in resp.read().decode().splitlines()
                      if line.startswith(("jaxfire:num_requests_running", "jaxfire:num_requests_waiting",
                                          "jaxfire:kv_cache_usage_perc"))}
        if not any(gauges.values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def check(tally: collections.Counter, count: int) -> list[str]:
    """What is wrong with a phase's tally: anything but answered, hung up or refused with 429."""
    problems = [f"{n} {outcome}" for outcome, n in tally.items() if outcome not in ("ok", "hung-up", "429")]
    if sum(tally.values()) != count:
        problems.append(f"{count - sum(tally.values())} requests without an outcome")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000, help="connections opened at once (burst), in flight (soak)")
    p.add_argument("--requests", type=int, default=10_000, help="soak requests (0: burst only)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--max-concurrent-requests", type=int, default=1024)
    p.add_argument("--deadline", type=float, default=1800.0, help="seconds for the whole run")
    args = p.parse_args(argv)

    root = pathlib.Path(__file__).resolve().parents[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxfire.server", "--host", HOST, "--port", "0", "--slots", str(args.slots),
         "--max-len", str(args.max_len), "--max-concurrent-requests", str(args.max_concurrent_requests)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    problems: list[str] = []
    try:
        for line in server.stdout:
            if line.startswith("serving "):
                break
        else:
            raise SystemExit("the server did not start")
        port = int(line.split()[3].split(":")[2].split("/")[0])
        body = {"prompt": "def fibonacci(n):", "max_tokens": args.max_tokens, "temperature": 0.7,
                "ignore_eos": True}
        start = time.monotonic()

        async def phases() -> None:
            t0 = time.monotonic()
            burst = await run(port, args.clients, args.clients, body)
            print(f"burst: {args.clients} clients at once in {time.monotonic() - t0:.1f} s: {dict(burst)}", flush=True)
            problems.extend(f"burst: {x}" for x in check(burst, args.clients))
            if not idle(port):
                problems.append("burst: requests still running or waiting afterwards")
            if not args.requests:
                return
            rss = {}

            def sample(done: int) -> None:
                if done in (min(1000, args.requests), args.requests):
                    rss[done] = rss_bytes(server.pid)

            t0 = time.monotonic()
            soak = await run(port, args.requests, args.clients, body, sample)
            print(f"soak: {args.requests} requests, {args.clients} at a time, in {time.monotonic() - t0:.1f} s: "
                  f"{dict(soak)}", flush=True)
            problems.extend(f"soak: {x}" for x in check(soak, args.requests))
            if not idle(port):
                problems.append("soak: requests still running or waiting afterwards")
            first, last = rss[min(1000, args.requests)], rss[args.requests]
            growth = last / first - 1
            print(f"server RSS: {first / 2**20:.0f} MiB after {min(1000, args.requests)} requests, "
                  f"{last / 2**20:.0f} MiB after {args.requests} ({growth:+.1%})", flush=True)
            if growth > 0.10:
                problems.append(f"soak: resident memory grew {growth:.1%} (more than 10%)")

        asyncio.run(asyncio.wait_for(phases(), args.deadline - (time.monotonic() - start)))
    finally:
        server.terminate()
        code = server.wait(timeout=120)
        server.stdout.close()
    if code != 0:
        problems.append(f"the server exited with {code} on SIGTERM")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
