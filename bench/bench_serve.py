"""`dairllm serve` under 16 concurrent clients of the official `openai` package.

    python bench/bench_serve.py [--clients 16] [--requests 4] [--max-tokens 32] [--rounds 2]
                                [--model M.m --tokenizer T.t] [--max-queue 16]

Starts `python -m dairllm serve` (with an API key from $DAIRLLM_API_KEY) on 127.0.0.1 and runs
rounds of `--clients` threads, each sending `--requests` requests in turn: chat and completions,
streaming and not, and every fifth a stream the client abandons after its first pieces. Every
request must end as answered (200), refused with a proper status (429/503, an OpenAI error body)
or abandoned on purpose; anything else is counted as lost. Reported: outcomes, p50/p99 time to
first token of the streams, aggregate generated tokens/s, the server's RSS before and after each
round (from /proc), how long an oversized prompt (3 MB, under the body limit) and an oversized
body (15 MB) take to be refused, and the server's own /metrics counters at the end.

The default model is the tiny Qwen3 Q40 of tests/golden (decode costs little; what is measured is
the server). On a machine shared with other jobs, absolute numbers move; the outcome counts and
RSS are what must hold.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path("/work/shared/golden/models") if Path("/work/shared/golden/models").is_dir() \
    else ROOT / "tests" / "golden" / "models"
KEY = "bench-serve-key"
PROMPTS = ["Tell me about the sea.", "Count to ten.", "Write a haiku about CPUs.",
           "What is a cache?", "Summarise: the quick brown fox jumps over the lazy dog."]


@dataclass
class Outcome:
    kind: str                        # "ok", "refused", "abandoned", "lost"
    status: int = 200
    ttft: float | None = None        # streams: seconds to the first text
    tokens: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Round:
    outcomes: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raw_request(port: int, method: str, path: str, body: bytes | None = None,
                key: str = KEY, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {key}",
                                                       "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dairllm", "serve", "--model", str(args.model), "--tokenizer",
           str(args.tokenizer), "--port", str(port), "--max-queue", str(args.max_queue),
           "--max-tokens", str(args.max_tokens), "--chat-template", args.chat_template]
    env = dict(os.environ, DAIRLLM_API_KEY=KEY, PYTHONPATH=str(ROOT / "src"),
               OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if raw_request(port, "GET", "/health", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("serve did not come up in 120 s")
        time.sleep(0.2)


def one_request(client, openai, i: int, max_tokens: int) -> Outcome:
    """Request number i of a client: its kind cycles through five."""
    kind = i % 5
    prompt = PROMPTS[i % len(PROMPTS)]
    chat = kind in (0, 1, 4)
    stream = kind in (0, 2, 4)
    t0 = time.monotonic()
    try:
        if chat:
            kw = dict(model="bench", messages=[{"role": "user", "content": prompt}],
                      max_tokens=max_tokens, temperature=0.7, seed=i)
            if stream:
                kw["stream_options"] = {"include_usage": True}
            r = client.chat.completions.create(stream=stream, **kw)
        else:
            r = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                          temperature=0.7, seed=i, stream=stream,
                                          stream_options={"include_usage": True} if stream
                                          else None)
        if not stream:
            return Outcome("ok", tokens=r.usage.completion_tokens,
                           seconds=time.monotonic() - t0)
        ttft, pieces, tokens = None, 0, 0
        for chunk in r:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            text = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) \
                if chunk.choices else None
            if text:
                ttft = ttft if ttft is not None else time.monotonic() - t0
                pieces += 1
                if kind == 4 and pieces == 2:        # the client walks away mid-stream
                    r.close()
                    return Outcome("abandoned", ttft=ttft, tokens=pieces,
                                   seconds=time.monotonic() - t0)
        return Outcome("ok", ttft=ttft, tokens=tokens, seconds=time.monotonic() - t0)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        proper = e.status_code in (429, 503) and "message" in (body.get("error") or body)
        return Outcome("refused" if proper else "lost", status=e.status_code,
                       seconds=time.monotonic() - t0, detail=str(e)[:200])
    except Exception as e:                          # timeouts, dropped connections: lost
        return Outcome("lost", status=0, seconds=time.monotonic() - t0,
                       detail=f"{type(e).__name__}: {e}"[:200])


def run_round(args, port: int, openai) -> tuple[Round, float]:
    rnd = Round()

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                               timeout=args.timeout, max_retries=0)
        for j in range(args.requests):
            rnd.add(one_request(client, openai, c * args.requests + j, args.max_tokens))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.timeout * args.requests + 30)
    return rnd, time.monotonic() - t0


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def timed_refusal(port: int, body: bytes) -> tuple[int, float]:
    t0 = time.monotonic()
    status, _ = raw_request(port, "POST", "/v1/chat/completions", body)
    return status, time.monotonic() - t0


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=GOLDEN / "qwen3tiny_q40.m")
    ap.add_argument("--tokenizer", type=Path, default=GOLDEN / "qwen3tiny_q40.t")
    ap.add_argument("--chat-template", default="chatml")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    import openai

    sock_port = _free_port()
    proc = start_server(args, sock_port)
    summary: dict = {"model": args.model.name, "clients": args.clients, "rounds": []}
    try:
        for i in range(3):                           # warm-up: first allocations, caches
            raw_request(sock_port, "POST", "/v1/completions",
                        json.dumps({"prompt": PROMPTS[i], "max_tokens": 4}).encode())
        huge_prompt = json.dumps({"messages": [{"role": "user",
                                                "content": "a" * (3 << 20)}]}).encode()
        summary["huge_prompt_status_seconds"] = timed_refusal(sock_port, huge_prompt)
        summary["huge_body_status_seconds"] = timed_refusal(sock_port, b"{" + b" " * (15 << 20))
        summary["bad_key_status"] = raw_request(sock_port, "GET", "/v1/models", key="nope")[0]
        for r in range(args.rounds):
            before = rss_kib(proc.pid)
            rnd, wall = run_round(args, sock_port, openai)
            after = rss_kib(proc.pid)
            summary["rounds"].append(round_summary(rnd, wall, before, after, args))
        metrics, t_end = {}, time.monotonic()
        while time.monotonic() - t_end < 10:       # abandoned streams are noticed at a send
            metrics = parse_metrics(raw_request(sock_port, "GET", "/metrics")[1].decode())
            if metrics["dairllm_queue_depth"] == metrics["dairllm_running_requests"] == 0:
                break
            time.sleep(0.1)
        summary["settled_after_s"] = round(time.monotonic() - t_end, 2)
        summary["server_metrics"] = {k: v for k, v in metrics.items()
                                     if k.startswith(("dairllm_generations_total",
                                                      "dairllm_http_requests_total",
                                                      "dairllm_queue_depth",
                                                      "dairllm_running_requests",
                                                      "dairllm_generated_tokens_total"))}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    print(json.dumps(summary, indent=1) if args.json else report(summary))
    lost = sum(r["outcomes"].get("lost", 0) for r in summary["rounds"])
    return 1 if lost else 0


def round_summary(rnd: Round, wall: float, rss_before: int, rss_after: int, args) -> dict:
    counts: dict = {}
    for o in rnd.outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    ttfts = [o.ttft for o in rnd.outcomes if o.ttft is not None]
    tokens = sum(o.tokens for o in rnd.outcomes if o.kind == "ok")
    return {"requests": len(rnd.outcomes), "expected": args.clients * args.requests,
            "outcomes": counts, "wall_s": round(wall, 2),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 4),
            "ttft_p99_s": round(percentile(ttfts, 0.99), 4),
            "latency_p50_s": round(statistics.median(o.seconds for o in rnd.outcomes), 3),
            "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "rss_before_mib": round(rss_before / 1024, 1),
            "rss_after_mib": round(rss_after / 1024, 1),
            "lost_details": [o.detail for o in rnd.outcomes if o.kind == "lost"][:5]}


def report(s: dict) -> str:
    lines = [f"model {s['model']}, {s['clients']} concurrent openai clients",
             "oversized prompt (3 MB): status %d in %.3f s" % tuple(s["huge_prompt_status_seconds"]),
             "oversized body (15 MB): status %d in %.3f s" % tuple(s["huge_body_status_seconds"]),
             f"wrong API key: status {s['bad_key_status']}"]
    for i, r in enumerate(s["rounds"]):
        lines.append(f"round {i}: {r['requests']}/{r['expected']} requests {r['outcomes']} in "
                     f"{r['wall_s']} s; TTFT p50 {r['ttft_p50_s']} s p99 {r['ttft_p99_s']} s; "
                     f"{r['tokens_per_s']} tokens/s aggregate; RSS {r['rss_before_mib']} -> "
                     f"{r['rss_after_mib']} MiB")
        lines += [f"  lost: {d}" for d in r["lost_details"]]
    lines.append(f"server idle (queue 0, running 0) {s['settled_after_s']} s after the last "
                 "client returned; its /metrics: " + json.dumps(s["server_metrics"]))
    return "\n".join(lines)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
