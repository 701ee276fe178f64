"""Workers that find each other (cluster/discovery.py, `worker --advertise`, `--discover`).

Oracles, each independent of the code under test:
- the datagram layouts: built and parsed here with struct from the documented fields;
- which workers are usable: each worker's own secret and model, chosen by the test;
- the tokens of a discovered cluster: the same command with explicit --workers (and the
  worker addresses the test started), and the single-node run;
- the LAN: real network namespaces on a bridge (ip netns), workers inside them with the default
  advertising rule (0.0.0.0 + a secret) and the default discovery port.
Every wait is bounded, everything started is stopped (namespaces deleted).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from dairllm.cluster import discovery as D
from dairllm.cluster.local import LocalWorker
from dairllm.commands.worker import should_advertise
from helpers import golden

TIMEOUT = 120
MODEL, TOKENIZER = golden.model("tiny_q40"), golden.tokenizer("tiny_q40")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def dairllm(*args: str, prefix: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "dairllm", *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


def query(nonce: bytes) -> bytes:
    """The documented query: magic, version 1, nonce, zero padding to 48 bytes."""
    return b"DAIRWHO?" + b"\x01" + nonce + bytes(48 - 9 - len(nonce))


def ask(port: int, data: bytes, wait: float = 0.5) -> "bytes | None":
    """Send `data` to 127.0.0.1:port; the answer, or None after `wait` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(1024)
        except socket.timeout:
            return None


# ---------------------------------------------------------------------------------------------
# The datagrams and the advertiser


def test_advertiser_answers_a_query_with_its_port_and_nothing_else():
    port = free_udp_port()
    with D.Advertiser(tcp_port=4321, port=port):
        nonce = os.urandom(16)
        reply = ask(port, query(nonce))
        assert reply is not None and len(reply) == 8 + 1 + 16 + 8 + 2
        assert len(reply) <= len(query(nonce))              # no amplification
        magic, version, got, _, tcp = struct.unpack("<8sB16s8sH", reply)
        assert (magic, version, got, tcp) == (b"DAIRHERE", 1, nonce, 4321)
        for bad in (query(nonce)[:-1], query(nonce) + b"\0", b"DAIRWHO?" + b"\x02" + bytes(39),
                    b"XAIRWHO?" + bytes(40), b""):
            assert ask(port, bad, wait=0.3) is None, bad


def test_parse_reply_takes_only_answers_to_our_nonce():
    nonce, instance = os.urandom(16), os.urandom(8)
    good = struct.pack("<8sB16s8sH", b"DAIRHERE", 1, nonce, instance, 9990)
    assert D.parse_reply(good, nonce) == (instance, 9990)
    assert D.parse_reply(good, os.urandom(16)) is None
    assert D.parse_reply(good[:-1], nonce) is None
    assert D.parse_reply(struct.pack("<8sB16s8sH", b"DAIRHERE", 1, nonce, instance, 0), nonce) \
        is None
    assert D.parse_reply(struct.pack("<8sB16s8sH", b"DAIRHERE", 2, nonce, instance, 1), nonce) \
        is None


def test_discover_finds_every_advertiser_once_and_ignores_forged_answers():
    """Two advertisers on one UDP port (both answer the loopback broadcast), and a responder
    that answers with someone else's nonce: only the two are found, each once, in the time."""
    port = free_udp_port()
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    fake.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    fake.bind(("0.0.0.0", port))
    fake.settimeout(0.1)
    stop = threading.Event()

    def forge() -> None:
        while not stop.is_set():
            try:
                _, peer = fake.recvfrom(64)
            except socket.timeout:
                continue
            fake.sendto(struct.pack("<8sB16s8sH", b"DAIRHERE", 1, os.urandom(16), b"f" * 8, 7),
                        peer)

    t = threading.Thread(target=forge, daemon=True)
    t.start()
    try:
        with D.Advertiser(1111, port), D.Advertiser(2222, port):
            t0 = time.monotonic()
            found = D.discover(0.6, port, targets=[D.LOOPBACK_BROADCAST])
            elapsed = time.monotonic() - t0
    finally:
        stop.set()
        t.join(2)
        fake.close()
    assert sorted(f.port for f in found) == [1111, 2222]
    assert all(f.hosts == ["127.0.0.1"] for f in found)
    assert elapsed < 0.6 + 2.0                         # bounded (generous: a shared machine)


def test_discover_with_nobody_there_returns_nothing_in_time():
    t0 = time.monotonic()
    assert D.discover(0.3, free_udp_port(), targets=[D.LOOPBACK_BROADCAST]) == []
    assert time.monotonic() - t0 < 0.3 + 2.0


def test_default_advertising_needs_a_secret_and_a_reachable_address():
    assert should_advertise(None, "0.0.0.0", b"S")
    assert should_advertise(None, "10.0.0.2", b"S")
    assert not should_advertise(None, "0.0.0.0", None)
    assert not should_advertise(None, "127.0.0.1", b"S")
    assert should_advertise(True, "127.0.0.1", None)
    assert not should_advertise(False, "0.0.0.0", b"S")


def test_a_taken_discovery_port_stops_only_an_explicit_advertise():
    """By default (0.0.0.0 + secret) the worker still serves, with a warning; --advertise fails
    with a clear error."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:   # no SO_REUSEPORT: exclusive
        taken.bind(("0.0.0.0", 0))
        port = str(taken.getsockname()[1])
        w = LocalWorker(MODEL, host="0.0.0.0", capture_stderr=True,
                        args=["--secret", "S", "--discovery-port", port, "--speed", "1e9"])
        try:
            w.wait_ready(60)
        finally:
            log = w.stop()
        assert "not advertising" in log
        r = dairllm("worker", "--model", str(MODEL), "--host", "127.0.0.1", "--port", "0",
                    "--advertise", "--discovery-port", port, "--speed", "1e9")
        assert r.returncode == 1 and "cannot advertise on UDP port" in r.stderr
        assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# Real workers on 127.0.0.1


def start_workers(specs: list, port: int, **kw) -> list:
    """LocalWorkers advertising on UDP `port`: specs are (model, secret or None) pairs."""
    workers = []
    try:
        for model, secret in specs:
            args = ["--advertise", "--discovery-port", str(port), "--speed", "1e9"]
            workers.append(LocalWorker(model, args=args + (["--secret", secret] if secret else []),
                                       capture_stderr=True, **kw))
        for w in workers:
            w.wait_ready(60)
        return workers
    except BaseException:
        for w in workers:
            w.stop()
        raise


@pytest.fixture
def loopback_cluster():
    """Two workers with secret S, one with secret X, one with no secret, one with another model."""
    port = free_udp_port()
    specs = [(MODEL, "S"), (MODEL, "S"), (MODEL, "X"), (MODEL, None),
             (golden.model("qwen3tiny_q40"), "S")]
    workers = start_workers(specs, port)
    yield port, workers
    for w in workers:
        w.stop()


def test_check_workers_keeps_only_those_that_prove_the_secret(loopback_cluster):
    port, (good1, good2, other_secret, no_secret, other_model) = loopback_cluster
    found = D.discover(1.0, port, targets=[D.LOOPBACK_BROADCAST])
    assert sorted(f"127.0.0.1:{f.port}" for f in found) == sorted(
        w.addr for w in (good1, good2, other_secret, no_secret, other_model))
    checked = {c.address: c for c in D.check_workers(found, MODEL, b"S", timeout=20)}
    assert checked[good1.addr].usable and checked[good2.addr].usable
    assert "authentication failed" in checked[other_secret.addr].reason
    assert "wrong secret" in checked[no_secret.addr].reason
    assert "different model" in checked[other_model.addr].reason


def test_generate_discover_matches_explicit_workers(loopback_cluster):
    port, (good1, good2, other_secret, no_secret, other_model) = loopback_cluster
    good = sorted([good1.addr, good2.addr], key=lambda a: int(a.rsplit(":", 1)[1]))
    common = ["generate", "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--prompt",
              "hello world", "--steps", "10", "--temperature", "0", "--nthreads", "1", "--json",
              "--secret", "S", "--layers", "0-1,2-2,3-3", "--buffer-float-type", "f32"]
    explicit = dairllm(*common, "--workers", *good)
    found = dairllm(*common, "--discover", "--discover-timeout", "1", "--discovery-port",
                    str(port))
    single = dairllm(*common[:-6])
    for r in (explicit, found, single):
        assert r.returncode == 0, r.stderr
    a, b, c = (json.loads(r.stdout) for r in (explicit, found, single))
    assert b["generated_tokens"] == a["generated_tokens"] == c["generated_tokens"]
    assert b["assignment"] == a["assignment"] == [[0, 2], [2, 3], [3, 4]]
    listing, _, table = found.stderr.partition("layer assignment")
    assert "discovered 5 worker(s)" in listing
    for w in (good1, good2):
        assert f"{w.addr} " in listing and f"{w.addr} " in table
    for w in (other_secret, no_secret, other_model):        # listed as unusable, never used
        line = next(l for l in listing.splitlines() if w.addr in l)
        assert "unusable:" in line
        assert w.addr not in table


def test_plan_discover_and_bad_flags(loopback_cluster):
    port, (good1, good2, *_) = loopback_cluster
    r = dairllm("plan", "--model", str(MODEL), "--secret", "S", "--discover",
                "--discover-timeout", "1", "--discovery-port", str(port))
    assert r.returncode == 0, r.stderr
    listing, _, table = r.stdout.partition("pipeline layer assignment")
    assert "discovered 5 worker(s)" in listing and listing.count("unusable: ") == 3
    assert f"{good1.addr} " in table and f"{good2.addr} " in table
    r = dairllm("plan", "--model", str(MODEL), "--secret", "nobody-has-this", "--discover",
                "--discover-timeout", "0.5", "--discovery-port", str(port))
    assert r.returncode == 1 and "no usable worker" in r.stderr and "Traceback" not in r.stderr
    r = dairllm("generate", "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--prompt", "x",
                "--discover", "--workers", good1.addr)
    assert r.returncode == 1 and "drop --workers" in r.stderr
    r = dairllm("generate", "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--prompt", "x",
                "--discover", "--discover-timeout", "0")
    assert r.returncode == 1 and "--discover-timeout must be positive" in r.stderr
    r = dairllm("generate", "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--prompt", "x",
                "--discover", "--protocol", "dllama")
    assert r.returncode == 1 and "needs the native protocol" in r.stderr


def test_chat_discover_answers_as_explicit_workers_and_single_node():
    """chat (hence serve: both open the model through open_session) with --discover: the same
    greedy replies as with explicit --workers and as one node; the listing goes to stderr."""
    port = free_udp_port()
    workers = start_workers([(MODEL, "S"), (MODEL, "S")], port)
    try:
        addrs = sorted((w.addr for w in workers), key=lambda a: int(a.rsplit(":", 1)[1]))
        common = ["chat", "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--chat-template",
                  "chatml", "--temperature", "0", "--max-tokens", "6", "--nthreads", "1"]
        cluster = ["--secret", "S", "--layers", "0-1,2-2,3-3", "--buffer-float-type", "f32"]
        turns = "Hello there\nAnd a second question?\n"
        runs = [subprocess.run([sys.executable, "-m", "dairllm", *common, *extra], input=turns,
                               capture_output=True, text=True, timeout=TIMEOUT)
                for extra in ([], [*cluster, "--workers", *addrs],
                              [*cluster, "--discover", "--discover-timeout", "1",
                               "--discovery-port", str(port)])]
    finally:
        for w in workers:
            w.stop()
    for r in runs:
        assert r.returncode == 0, r.stderr
    single, explicit, found = runs
    assert len(single.stdout.splitlines()) == 2
    assert found.stdout == explicit.stdout == single.stdout
    assert "discovered 2 worker(s)" in found.stderr
    assert all(f"{a} " in found.stderr.split("layer assignment")[1] for a in addrs)


# ---------------------------------------------------------------------------------------------
# The done-when: namespaces on a bridge


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Lan:
    """Network namespaces joined by a bridge (in a namespace of its own, so the host's network is
    untouched): node i gets 10.<net>.0.<i+2>/24. Deleting the namespaces removes everything."""

    def __init__(self, nodes: int) -> None:
        tag = f"dd{os.getpid() % 100000}"
        self.bridge_ns = f"{tag}br"
        self.names = [f"{tag}n{i}" for i in range(nodes)]
        net = 100 + os.getpid() % 100
        self.ips = [f"10.{net}.0.{i + 2}" for i in range(nodes)]
        self.created: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.ips)):
            self._add_ns(ns)
            ip("-n", self.bridge_ns, "link", "add", f"e{i}", "type", "veth", "peer", "name",
               "eth0", "netns", ns)
            ip("-n", self.bridge_ns, "link", "set", f"e{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "brd", "+", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def prefix(self, i: int) -> tuple:
        return ("ip", "netns", "exec", self.names[i])

    def close(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created = []


@pytest.fixture
def lan():
    try:
        subprocess.run(["ip", "netns", "add", f"ddprobe{os.getpid()}"], check=True,
                       capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", f"ddprobe{os.getpid()}"], capture_output=True,
                       timeout=30)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"this machine refuses network namespaces (ip netns add: {e})")
    net = Lan(4)                 # node 0: the root; 1, 2: secret S; 3: secret X
    yield net
    net.close()


def test_discovery_across_namespaces_on_a_bridge(lan):
    """Workers with the defaults (0.0.0.0 and a secret: advertised on UDP 9990) in namespaces of
    their own; the root in another one finds the two with its secret, lists the third as
    unusable, and generates the same tokens as with explicit --workers."""
    workers = []
    try:
        for i, secret in ((1, "S"), (2, "S"), (3, "X")):
            workers.append(LocalWorker(MODEL, host="0.0.0.0", connect_host=lan.ips[i],
                                       prefix=lan.prefix(i), capture_stderr=True,
                                       args=["--secret", secret, "--speed", "1e9"]))
        for w in workers:
            w.wait_ready(60)
        common = ["generate", "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--prompt",
                  "hello world", "--steps", "10", "--temperature", "0", "--nthreads", "1",
                  "--json", "--secret", "S", "--layers", "0-1,2-2,3-3", "--buffer-float-type", "f32"]
        explicit = dairllm(*common, "--workers", workers[0].addr, workers[1].addr,
                           prefix=lan.prefix(0))
        found = dairllm(*common, "--discover", "--discover-timeout", "1.5",
                        prefix=lan.prefix(0))
    finally:
        logs = [w.stop() for w in workers]
    assert explicit.returncode == 0, explicit.stderr
    assert found.returncode == 0, (found.stderr, logs)
    a, b = json.loads(explicit.stdout), json.loads(found.stdout)
    assert b["generated_tokens"] == a["generated_tokens"] and len(a["generated_tokens"]) == 10
    assert b["assignment"] == a["assignment"] == [[0, 2], [2, 3], [3, 4]]
    listing, _, table = found.stderr.partition("layer assignment")
    assert "discovered 3 worker(s)" in listing
    for w in workers[:2]:
        assert f"{w.addr} " in listing and f"{w.addr} " in table
    bad = next(l for l in listing.splitlines() if workers[2].addr in l)
    assert "unusable:" in bad and "authentication failed" in bad
    assert workers[2].addr not in table
