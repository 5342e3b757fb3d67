"""Fairness, rate limits and priorities over HTTP, against one `serve` this script starts
(default model, server defaults, a keys file of its own). Stdlib only.

    python3 benches/fairness.py [--serve target/release/serve] [--scenarios ttft,share,tpm,priority]
                                [--seconds 60] [--json FILE] [-- extra serve flags]

Scenarios (each prints one JSON line; ratios come from the same run):
  ttft      tenant B alone: one short chat at a time (16-token answers), TTFT p99; then the same
            while tenant A keeps 24 streams of ~1,300-token prompts with 400-token answers busy.
  share     A (weight 1) and B (weight 2 or 1, `--weights`) both backlogged (24 streams each,
            A long, B short) for --seconds: the cost each was served in that window (prompt
            tokens x1 + generated x2, the scheduler's measure, and plain tokens) over its weight.
  tpm       a tenant with tokens_per_minute = T offers 10 T for 2 minutes: the most tokens any
            60-second window held (counted by the client as they arrive), over T.
  priority  high-priority (priority -1, header) single chats alone, then under a flood of
            24 low-priority (priority 5) streams: TTFT p99 ratio.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import http.client

ap = argparse.ArgumentParser()
ap.add_argument("--serve", default="target/release/serve")
ap.add_argument("--scenarios", default="ttft,share,tpm,priority")
ap.add_argument("--seconds", type=float, default=60)
ap.add_argument("--weights", default="1,2")
ap.add_argument("--tpm", type=int, default=2000)
ap.add_argument("--json")
ap.add_argument("--server-log", help="append the server's stderr here")
ap.add_argument("--light-requests", type=int, default=30)
ap.add_argument("--plain-keys", action="store_true",
                help="keys without weights, limits or priorities (a binary from before them)")
ap.add_argument("extra", nargs="*")
opt = ap.parse_args()

KEYS = f"""
[keys."sk-a"]
tenant = "heavy"
[keys."sk-b"]
tenant = "light"
[keys."sk-w1"]
tenant = "one"
weight = {opt.weights.split(',')[0]}
[keys."sk-w2"]
tenant = "two"
weight = {opt.weights.split(',')[1]}
[keys."sk-tpm"]
tenant = "metered"
tokens_per_minute = {opt.tpm}
[keys."sk-gw"]
tenant = "gateway"
min_priority = -10
[keys."sk-flood"]
tenant = "gateway"
[keys."sk-admin"]
tenant = "ops"
admin = true
"""

if opt.plain_keys:
    KEYS = "\n".join(l for l in KEYS.splitlines() if l.startswith(("[", "tenant", "admin")))

tmp = tempfile.mkdtemp()
open(f"{tmp}/keys.toml", "w").write(KEYS)
server, port = None, None


def start_server():
    """A fresh server for each scenario, so none inherits another's backlog."""
    global server, port
    stop_server()
    state = tempfile.mkdtemp(dir=tmp)
    server = subprocess.Popen([opt.serve, "--port", "0", "--api-keys", f"{tmp}/keys.toml", "--state-dir",
                               state, *opt.extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    port = None
    for line in server.stderr:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "serve did not start"
    log = open(opt.server_log, "a") if opt.server_log else None
    threading.Thread(target=lambda s=server: [log and (log.write(l), log.flush()) for l in s.stderr],
                     daemon=True).start()


def stop_server():
    global server
    if server is not None:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server = None


OPEN = set()
OPEN_LOCK = threading.Lock()


def stop_all(stop):
    """Ends every client at once: their connections are shut (the server cancels them)."""
    stop.set()
    with OPEN_LOCK:
        for c in list(OPEN):
            try:
                c.sock.shutdown(2)
            except Exception:
                pass

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches under amber lanterns near the old harbour ").split()


def long_text(n_words, seed):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words))


def chat(key, content, max_tokens, priority=None, header_priority=None, timeout=900, stop=None):
    """One streamed greedy chat; returns (status, ttft, [arrival times], prompt_tokens)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if priority is not None:
        body["priority"] = priority
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    if header_priority is not None:
        headers["x-loraplex-priority"] = str(header_priority)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.time()
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        if stop is not None:
            with OPEN_LOCK:
                OPEN.add(c)
            if stop.is_set():
                raise OSError("stopped")
        r = c.getresponse()
        return read_stream(c, r, t0, stop)
    except (OSError, http.client.HTTPException):
        return 0, None, [], 0
    finally:
        with OPEN_LOCK:
            OPEN.discard(c)
        c.close()


def read_stream(c, r, t0, stop):
    if r.status != 200:
        r.read()
        return r.status, None, [], 0
    ttft, times, prompt = None, [], 0
    try:
        for line in r:
            if stop is not None and stop.is_set():
                break  # closing the connection cancels the request at the engine's next step
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            now = time.time()
            if ev.get("usage"):
                prompt = ev["usage"]["prompt_tokens"]
                continue
            ch = ev["choices"][0]
            if ch.get("delta", {}).get("content") or ch.get("finish_reason"):
                if ttft is None:
                    ttft = now - t0
                times.append(now)
    except (OSError, http.client.HTTPException, ValueError):
        pass  # cut by `stop_all`: what arrived before counts
    return 200, ttft, times, prompt


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else None


def loop(stop, fn):
    def run():
        while not stop.is_set():
            try:
                fn(stop)
            except (OSError, http.client.HTTPException, ValueError):
                pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


LIGHT_STARTS = []


def light_ttfts(key, n, **kw):
    out = []
    for i in range(n):
        LIGHT_STARTS.append(time.time())
        s, ttft, _, _ = chat(key, f"What is {i} plus {i}? Answer briefly.", 16, **kw)
        assert s == 200, s
        out.append(ttft)
    return out


results = []


def report(d):
    print(json.dumps(d), flush=True)
    results.append(d)


def ttft():
    light_ttfts("sk-b", 3)  # warm up
    alone = light_ttfts("sk-b", opt.light_requests)
    stop = threading.Event()
    heavy = [loop(stop, lambda st, i=i: chat("sk-a", long_text(1000, i), 400, stop=st)) for i in range(24)]
    time.sleep(20)  # the heavy tenant fills the engine
    m0, t0 = served_by_server(), time.time()
    loaded = light_ttfts("sk-b", opt.light_requests)
    m1, t1 = served_by_server(), time.time()
    stop_all(stop)
    out = {"scenario": "ttft", "light_alone_p99_s": round(p99(alone), 3),
           "light_with_heavy_p99_s": round(p99(loaded), 3), "ratio": round(p99(loaded) / p99(alone), 2),
           "light_with_heavy_p50_s": round(sorted(loaded)[len(loaded) // 2], 3)}
    if m0 is not None:
        # What the light tenant's first tokens cost the heavy one: its service meanwhile.
        for kind in ("prompt", "generated"):
            n = m1.get(("heavy", kind), 0) - m0.get(("heavy", kind), 0)
            out[f"heavy_{kind}_tokens_per_s"] = round(n / (t1 - t0), 1)
        out["interrupted_steps"] = metric("loraplex_interrupted_steps_total")
        out["preemptions"] = metric("loraplex_num_preemptions_total")
    out["light_with_heavy_s"] = [round(x, 2) for x in loaded]
    if opt.server_log:
        out["light_starts_ms"] = [int(t * 1000) for t in LIGHT_STARTS[-len(loaded):]]
    report(out)
    wait_idle()


def wait_idle():
    pass  # each scenario has a server of its own


def metric(name):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics", headers={"authorization": "Bearer sk-admin"})
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(rf"^{name} (\S+)", text, re.M)
    return float(m.group(1)) if m else None


def served_by_server():
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics", headers={"authorization": "Bearer sk-admin"})
    text = c.getresponse().read().decode()
    c.close()
    got = {}
    for m in re.finditer(r'^loraplex_tenant_served_tokens_total\{kind="(\w+)",tenant="(\w*)"\} (\d+)', text, re.M):
        got[(m.group(2), m.group(1))] = int(m.group(3))
    return got if "loraplex_tenant_served_tokens_total" in text else None


def share():
    served = {"one": [], "two": []}
    lock = threading.Lock()
    stop = threading.Event()

    contents = {"one": [long_text(400, i) for i in range(24)], "two": [f"Say {i} words." for i in range(24)]}
    # Prompt sizes, learned first (a stream cut at the window's end never gets its usage), by
    # another tenant: service to "one" or "two" before the window would count against them.
    size = {}
    for tenant, key in (("one", "sk-admin"), ("two", "sk-admin")):
        for text in contents[tenant]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("POST", "/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
                {"content-type": "application/json", "authorization": f"Bearer {key}"})
            size[text] = json.loads(c.getresponse().read())["usage"]["prompt_tokens"]
            c.close()

    def client(key, tenant, content, n):
        def go(st):
            s, _, times, _ = chat(key, content, n, stop=st)
            with lock:
                if times:
                    served[tenant].append((times[0], size[content], 1))
                    served[tenant].extend((t, 0, 1) for t in times[1:])
        return go

    ts = [loop(stop, client("sk-w1", "one", contents["one"][i], 200)) for i in range(24)]
    ts += [loop(stop, client("sk-w2", "two", contents["two"][i], 16)) for i in range(24)]
    time.sleep(20)  # both backlogged
    t0 = time.time()
    m0 = served_by_server()
    # The server's count every 10 s too: each minute's share and every sliding 60-s window's,
    # beside the whole window's.
    marks = [m0]
    while time.time() < t0 + opt.seconds - 1:
        time.sleep(max(0, min(10, t0 + opt.seconds - time.time())))
        marks.append(served_by_server())
    t1 = time.time()
    m1 = marks[-1]
    stop_all(stop)
    time.sleep(3)  # the clients record what their cut streams got
    w = [float(x) for x in opt.weights.split(",")]
    out = {"scenario": "share", "seconds": opt.seconds, "weights": w}
    cost = {}
    for tenant in ("one", "two"):
        inside = [(p, c) for (t, p, c) in served[tenant] if t0 <= t < t1]
        cost[tenant] = sum(p + 2 * c for p, c in inside)
        out[f"{tenant}_tokens"] = sum(p + c for p, c in inside)
        out[f"{tenant}_cost"] = cost[tenant]
    total_w = w[0] + w[1]
    total = cost["one"] + cost["two"]
    out["one_share"] = round(cost["one"] / total, 3)
    out["one_expected_share"] = round(w[0] / total_w, 3)
    out["deviation"] = round(abs(cost["one"] / total - w[0] / total_w) / (w[0] / total_w), 3)
    # The server's count of what it served in the window (prompt tokens as they are fed, so a
    # request longer than the window is counted fairly; the client sees prompts only at the
    # first token). Only with a server that has the metric.
    if m0 is not None:
        srv = {t: {k: m1.get((t, k), 0) - m0.get((t, k), 0) for k in ("prompt", "generated")}
               for t in ("one", "two")}
        scost = {t: srv[t]["prompt"] + 2 * srv[t]["generated"] for t in srv}
        out["server_served"] = srv
        out["server_one_share"] = round(scost["one"] / max(1, scost["one"] + scost["two"]), 3)
        out["server_deviation"] = round(abs(out["server_one_share"] - w[0] / total_w) / (w[0] / total_w), 3)
        def dev(a, b):
            c = {t: (b.get((t, "prompt"), 0) - a.get((t, "prompt"), 0))
                 + 2 * (b.get((t, "generated"), 0) - a.get((t, "generated"), 0)) for t in ("one", "two")}
            return round(abs(c["one"] / max(1, c["one"] + c["two"]) - w[0] / total_w) / (w[0] / total_w), 3)
        out["server_deviation_each_minute"] = [dev(marks[i], marks[i + 6]) for i in range(0, len(marks) - 6, 6)]
        sliding = [dev(marks[i], marks[i + 6]) for i in range(len(marks) - 6)]
        out["server_deviation_worst_sliding_minute"] = max(sliding) if sliding else None
        out["server_deviation_each_10s"] = [dev(a, b) for a, b in zip(marks, marks[1:])]
        out["server_one_cost_each_10s"] = [
            (b.get(("one", "prompt"), 0) - a.get(("one", "prompt"), 0)) + 2 * (b.get(("one", "generated"), 0) - a.get(("one", "generated"), 0))
            for a, b in zip(marks, marks[1:])]
        out["server_two_cost_each_10s"] = [
            (b.get(("two", "prompt"), 0) - a.get(("two", "prompt"), 0)) + 2 * (b.get(("two", "generated"), 0) - a.get(("two", "generated"), 0))
            for a, b in zip(marks, marks[1:])]
    report(out)
    wait_idle()


def tpm():
    T = opt.tpm
    arrivals = []
    lock = threading.Lock()
    stop = threading.Event()
    refused = [0]

    def go(i, st):
        # Each request ~60 prompt tokens + 100 answer tokens; 10 clients offer about 10 T.
        s, _, times, prompt = chat("sk-tpm", f"Write about item {i} of the list, in detail please.", 100, stop=st)
        if s == 429:
            refused[0] += 1
            time.sleep(0.2)
            return
        with lock:
            if times:
                arrivals.append((times[0], prompt + 1))
                arrivals.extend((t, 1) for t in times[1:])

    ts = [loop(stop, lambda st, i=i: go(i, st)) for i in range(10)]
    t0 = time.time()
    time.sleep(120)
    stop_all(stop)
    time.sleep(2)
    arrivals.sort()
    worst = 0
    j = 0
    total = 0
    for i in range(len(arrivals)):
        total += arrivals[i][1]
        while arrivals[j][0] <= arrivals[i][0] - 60:
            total -= arrivals[j][1]
            j += 1
        worst = max(worst, total)
    served = sum(n for _, n in arrivals)
    report({"scenario": "tpm", "limit": T, "seconds": 120, "served": served, "refused_429": refused[0],
            "max_60s_window": worst, "ratio": round(worst / T, 3)})
    wait_idle()


def priority():
    light_ttfts("sk-gw", 3, header_priority=-1)
    alone = light_ttfts("sk-gw", opt.light_requests, header_priority=-1)
    stop = threading.Event()
    [loop(stop, lambda st, i=i: chat("sk-flood", long_text(300, i), 200, priority=5, stop=st)) for i in range(24)]
    time.sleep(20)
    loaded = light_ttfts("sk-gw", opt.light_requests, header_priority=-1)
    stop_all(stop)
    report({"scenario": "priority", "high_alone_p99_s": round(p99(alone), 3),
            "high_under_low_flood_p99_s": round(p99(loaded), 3), "ratio": round(p99(loaded) / p99(alone), 2)})
    wait_idle()


try:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    report({"cpu": cpu, "cores": os.cpu_count()})
    for s in opt.scenarios.split(","):
        start_server()
        {"ttft": ttft, "share": share, "tpm": tpm, "priority": priority}[s]()
finally:
    stop_server()
    if opt.json:
        json.dump(results, open(opt.json, "w"), indent=1)
