"""Adapters at scale, over HTTP against the real server (`target/release/serve`, default model),
which this script starts and stops itself. Stdlib only; not part of CI (minutes per scenario).

    python3 benches/scale.py [--serve target/release/serve] [--scenarios zipf,oversub,density,swap]
                             [--adapters 1000] [--requests 200] [--json FILE] [-- extra serve flags]

Adapters are PEFT LoRA written here (f16 safetensors, random values, each its own slice of a
random pool so no two are alike): half rank 8 on q/v, half rank 16 on q/k/v/o, for the default
model's shapes (SmolLM2-135M: 30 layers, hidden 576, KV 192). They are made once per `--work`
directory and reused by later runs.

Scenarios (one JSON line each; every ratio comes from the same run, same server flags):
  zipf      streaming chats at concurrency 8 (48-token answers, greedy, `ignore_eos`) whose
            adapter follows Zipf(1.0) over --adapters, against the same load all on one adapter:
            tokens/s ratio, TTFT p99 ratio, errors.
  oversub   twice as many hot adapters as `--max-resident-adapters` (--slots; 2x hot, uniform)
            against the same hot set with room for all: TTFT p99 ratio.
  density   10,000 adapters registered (directories of hard-linked files) against 10: start-up to
            the first answer of /v1/models, its time, idle RSS.
  swap      concurrency 8 on one adapter name whose weights are replaced every second for 30 s
            (two versions alternating, each with a distinguishable greedy answer): failures and
            answers that match neither version.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--serve", default="target/release/serve")
ap.add_argument("--scenarios", default="zipf,oversub,density,swap")
ap.add_argument("--adapters", type=int, default=1000)
ap.add_argument("--requests", type=int, default=200)
ap.add_argument("--conc", type=int, default=8)
ap.add_argument("--max-tokens", type=int, default=48)
ap.add_argument("--slots", type=int, default=64)
ap.add_argument("--warm", type=int, default=400, help="Zipf requests of one token before the zipf run")
ap.add_argument("--density", type=int, default=10000)
ap.add_argument("--swap-seconds", type=float, default=30)
ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loraplex-scale"))
ap.add_argument("--json")
ap.add_argument("--server-log")
ap.add_argument("extra", nargs="*")
opt = ap.parse_args()

LAYERS, HIDDEN, KV = 30, 576, 192
OUT = {"q": HIDDEN, "k": KV, "v": KV, "o": HIDDEN}
POOL_VALUES = 1 << 22
_pool = None


def pool():
    """4 Mi random f16 values in [-0.02, 0.02) as bytes: every adapter reads its own slices."""
    global _pool
    if _pool is None:
        rng = random.Random(11)
        _pool = struct.pack(f"<{POOL_VALUES}e", *(rng.uniform(-0.02, 0.02) for _ in range(POOL_VALUES)))
    return _pool


def write_adapter(path, seed, r, mods, scale_b=1.0):
    """A PEFT LoRA adapter (f16) of rank `r` on `mods`; `seed` picks its slices of the pool."""
    os.makedirs(path, exist_ok=True)
    rng = random.Random(seed)
    p = pool()
    header, chunks, off = {}, [], 0
    for l in range(LAYERS):
        for m in mods:
            for part, shape in (("lora_A", (r, HIDDEN)), ("lora_B", (OUT[m], r))):
                n = shape[0] * shape[1]
                start = rng.randrange(0, POOL_VALUES - n) * 2
                data = p[start:start + 2 * n]
                if part == "lora_B" and scale_b != 1.0:
                    vals = struct.unpack(f"<{n}e", data)
                    data = struct.pack(f"<{n}e", *(v * scale_b for v in vals))
                key = f"base_model.model.model.layers.{l}.self_attn.{m}_proj.{part}.weight"
                header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + len(data)]}
                chunks.append(data)
                off += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = os.path.join(path, "adapter_model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)
    os.replace(tmp, os.path.join(path, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
           "target_modules": [f"{m}_proj" for m in mods], "bias": "none", "use_dora": False, "use_rslora": False}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def shape_of(i):
    return (8, "qv") if i % 2 == 0 else (16, "qkvo")


def adapters_dir(n):
    d = os.path.join(opt.work, f"adapters-{n}")
    if os.path.exists(os.path.join(d, ".done")):
        return d
    print(f"writing {n} adapters into {d} ...", file=sys.stderr)
    for i in range(n):
        r, mods = shape_of(i)
        write_adapter(os.path.join(d, f"a{i:05d}"), i, r, mods)
    open(os.path.join(d, ".done"), "w").close()
    return d


def linked_dir(n, src):
    """`n` adapter directories whose files are hard links to `src`'s: registered, never loaded."""
    d = os.path.join(opt.work, f"linked-{n}")
    if os.path.exists(os.path.join(d, ".done")):
        return d
    shutil.rmtree(d, ignore_errors=True)
    for i in range(n):
        a = os.path.join(d, f"a{i:05d}")
        os.makedirs(a)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(os.path.join(src, f), os.path.join(a, f))
    open(os.path.join(d, ".done"), "w").close()
    return d


class Server:
    def __init__(self, adapters, *flags):
        self.state = tempfile.mkdtemp(dir=opt.work)
        self.t0 = time.time()
        self.p = subprocess.Popen([opt.serve, "--port", "0", "--adapters", adapters, "--state-dir", self.state,
                                   *flags, *opt.extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port = None
        for line in self.p.stderr:
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        assert self.port, "serve did not start"
        log = open(opt.server_log, "a") if opt.server_log else None
        threading.Thread(target=lambda: [log and (log.write(l), log.flush()) for l in self.p.stderr],
                         daemon=True).start()

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

    def rss_mb(self):
        for line in open(f"/proc/{self.p.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def chat(port, adapter, prompt, max_tokens):
    """One streamed greedy chat: (status, ttft, tokens, text)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if adapter:
        body["model"] = adapter
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.time()
    ttft, toks, text = None, 0, []
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return r.status, None, 0, r.read().decode(errors="replace")[:300]
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                toks = ev["usage"]["completion_tokens"]
                continue
            if "error" in ev:
                return 500, ttft, toks, json.dumps(ev)[:300]
            piece = ev["choices"][0].get("delta", {}).get("content")
            if piece and ttft is None:
                ttft = time.time() - t0
            text.append(piece or "")
        return 200, ttft, toks, "".join(text)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return 0, ttft, toks, repr(e)
    finally:
        c.close()


def p(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else None


def load(port, pick, requests):
    """Closed loop: `opt.conc` clients, `requests` chats; `pick(i, rng)` names the adapter."""
    lock, nxt, out = threading.Lock(), [0], []

    def worker(c):
        rng = random.Random(1000 + c)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= requests:
                return
            res = chat(port, pick(i, rng), f"Request {i}: tell me a story about the number {i * 7 + c}.",
                       opt.max_tokens)
            with lock:
                out.append(res)

    t0 = time.time()
    ts = [threading.Thread(target=worker, args=(c,)) for c in range(opt.conc)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.time() - t0
    ttfts = [r[1] for r in out if r[0] == 200]
    errors = [r for r in out if r[0] != 200]
    return {"requests": len(out), "tok_per_s": round(sum(r[2] for r in out) / wall, 1),
            "ttft_p50_s": round(p(ttfts, 0.5) or 0, 3), "ttft_p99_s": round(p(ttfts, 0.99) or 0, 3),
            "errors": len(errors), "first_error": errors[0][3] if errors else None}


def zipf_picker(names):
    cum, s = [], 0.0
    for k in range(len(names)):
        s += 1.0 / (k + 1)
        cum.append(s)

    def pick(i, rng):
        x = rng.random() * s
        lo, hi = 0, len(cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return names[lo]
    return pick


def metric(srv, name):
    _, body = srv.get("/metrics")
    tot = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            tot += float(line.rsplit(" ", 1)[1])
    return tot


def scenario_zipf():
    d = adapters_dir(opt.adapters)
    names = sorted(x for x in os.listdir(d) if x.startswith("a"))
    srv = Server(d)
    try:
        chat(srv.port, names[0], "warm up", 4)
        one = load(srv.port, lambda i, rng: names[1], opt.requests)
        # Steady state, not the cold start: the cache first sees --warm requests of the same law.
        max_tokens, opt.max_tokens = opt.max_tokens, 1
        load(srv.port, zipf_picker(names), opt.warm)
        opt.max_tokens = max_tokens
        h0, m0 = metric(srv, "loraplex_adapter_cache_hits_total"), metric(srv, "loraplex_adapter_cache_misses_total")
        zipf = load(srv.port, zipf_picker(names), opt.requests)
        h1, m1 = metric(srv, "loraplex_adapter_cache_hits_total"), metric(srv, "loraplex_adapter_cache_misses_total")
        zipf["cache_hit_rate"] = round((h1 - h0) / max(1, (h1 - h0) + (m1 - m0)), 3)
    finally:
        srv.stop()
    return {"scenario": "zipf", "adapters": len(names), "one": one, "zipf": zipf,
            "tok_ratio": round(zipf["tok_per_s"] / one["tok_per_s"], 3),
            "ttft_p99_ratio": round(zipf["ttft_p99_s"] / one["ttft_p99_s"], 3), "warm": opt.warm}


def scenario_oversub():
    hot = 2 * opt.slots
    d = adapters_dir(max(hot, opt.adapters))
    names = sorted(x for x in os.listdir(d) if x.startswith("a"))[:hot]
    uniform = lambda i, rng: names[rng.randrange(hot)]
    res = {}
    for label, slots in (("all_resident", hot), ("oversubscribed", opt.slots)):
        srv = Server(d, "--max-resident-adapters", str(slots))
        try:
            for n in names[:slots]:
                chat(srv.port, n, "warm up", 1)
            res[label] = load(srv.port, uniform, opt.requests)
        finally:
            srv.stop()
    res.update(scenario="oversub", hot=hot, slots=opt.slots,
               ttft_p99_ratio=round(res["oversubscribed"]["ttft_p99_s"] / res["all_resident"]["ttft_p99_s"], 3))
    return res


def scenario_density():
    src = os.path.join(adapters_dir(2), "a00001")
    res = {"scenario": "density"}
    for n in (10, opt.density):
        d = linked_dir(n, src)
        t0 = time.time()
        srv = Server(d)
        try:
            t1 = time.time()
            time.sleep(1)
            idle = srv.rss_mb()
            t2 = time.time()
            status, body = srv.get("/v1/models?limit=100")
            t3 = time.time()
            assert status == 200, body[:200]
            first = len(json.loads(body)["data"])
            t4 = time.time()
            status, body = srv.get("/v1/models")
            t5 = time.time()
            time.sleep(1)
            res[str(n)] = {"listening_s": round(t1 - t0, 3), "idle_rss_mb": round(idle, 1),
                           "first_page_s": round(t3 - t2, 4), "models_on_first_page": first,
                           "whole_list_s": round(t5 - t4, 4), "models_in_whole_list": len(json.loads(body)["data"]),
                           "rss_after_lists_mb": round(srv.rss_mb(), 1)}
        finally:
            srv.stop()
    a, b = res["10"], res[str(opt.density)]
    per = lambda k: round((b[k] - a[k]) * 2**20 / (opt.density - 10))
    res["rss_per_adapter_bytes"] = {"idle": per("idle_rss_mb"), "after_lists": per("rss_after_lists_mb")}
    return res


def scenario_swap():
    d = os.path.join(opt.work, "swap")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    versions = []
    for v in range(2):
        src = os.path.join(opt.work, f"swap-v{v}")
        if not os.path.exists(os.path.join(src, "adapter_model.safetensors")):
            write_adapter(src, 500 + v, 16, "qkvo", scale_b=40.0)
        versions.append(src)
    live = os.path.join(d, "hot")
    shutil.copytree(versions[0], live)
    srv = Server(d)
    prompt = "Write one sentence about the sea."
    try:
        # Each version's greedy answer, alone.
        answers = []
        for v in range(2):
            replace(live, versions[v])
            reload(srv, "hot")
            answers.append(chat(srv.port, "hot", prompt, 24)[3])
        assert answers[0] != answers[1], "the two versions answer alike: make them differ more"
        stop = threading.Event()
        lock, out = threading.Lock(), []

        def client():
            while not stop.is_set():
                res = chat(srv.port, "hot", prompt, 24)
                with lock:
                    out.append(res)
        swaps = [0]

        def swapper():
            v = 0
            while not stop.is_set():
                time.sleep(1)
                v ^= 1
                replace(live, versions[v])
                reload(srv, "hot")
                swaps[0] += 1
        ts = [threading.Thread(target=client) for _ in range(opt.conc)] + [threading.Thread(target=swapper)]
        [t.start() for t in ts]
        time.sleep(opt.swap_seconds)
        stop.set()
        [t.join() for t in ts]
    finally:
        srv.stop()
    failures = [r for r in out if r[0] != 200]
    mixed = [r for r in out if r[0] == 200 and r[3] not in answers]
    return {"scenario": "swap", "requests": len(out), "swaps": swaps[0], "failures": len(failures),
            "mixed_versions": len(mixed), "per_version": [sum(r[3] == a for r in out) for a in answers],
            "first_failure": failures[0][3] if failures else None, "first_mixed": mixed[0][3][:120] if mixed else None}


def replace(live, src):
    """New weights under the same name: files written beside, then renamed over."""
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(os.path.join(src, f), os.path.join(live, f + ".new"))
        os.replace(os.path.join(live, f + ".new"), os.path.join(live, f))


def reload(srv, name):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    c.request("POST", "/v1/adapters", json.dumps({"name": name}), {"content-type": "application/json"})
    r = c.getresponse()
    body = r.read()
    assert r.status in (200, 201), body[:300]


os.makedirs(opt.work, exist_ok=True)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
results = []
for s in opt.scenarios.split(","):
    r = globals()[f"scenario_{s}"]()
    r["cpu"] = cpu
    print(json.dumps(r), flush=True)
    results.append(r)
if opt.json:
    json.dump(results, open(opt.json, "w"), indent=1)
