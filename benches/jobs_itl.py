"""Serving's inter-token gaps with and without a fine-tuning job running in the same process.

    python3 benches/jobs_itl.py URL DATA.jsonl [SECONDS] [SERVER_PID]

Runs 4 greedy streaming chats (ignore_eos) for SECONDS (default 30) and prints their
inter-token p50/p99; then uploads DATA, starts a job (1 epoch) and measures again while it runs.
One JSON line per phase; with SERVER_PID, the server's resident memory (VmRSS) at each phase's
end and its peak (VmHWM). Any base the server trains on: f32, NF4 or GGUF served as stored.
"""
import json
import sys
import threading
import time
import urllib.request
import uuid

url, data = sys.argv[1], sys.argv[2]
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 30
pid = sys.argv[4] if len(sys.argv) > 4 else None


def memory():
    if pid is None:
        return {}
    fields = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":" in l)
    mb = lambda k: int(fields[k].split()[0]) // 1024
    return {"rss_mb": mb("VmRSS"), "peak_rss_mb": mb("VmHWM")}


def post(path, body, headers=None):
    req = urllib.request.Request(url + path, data=body, headers=headers or {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))


def get(path):
    return json.load(urllib.request.urlopen(url + path))


def streams(n, until):
    gaps, lock = [], threading.Lock()

    def one():
        while time.time() < until:
            body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                               "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json"})
            last = None
            with urllib.request.urlopen(req) as r:
                for line in r:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.time()
                    if last is not None:
                        with lock:
                            gaps.append(now - last)
                    last = now

    ts = [threading.Thread(target=one) for _ in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    gaps.sort()
    return {"tokens": len(gaps), "gap_p50_s": gaps[len(gaps) // 2], "gap_p99_s": gaps[int(len(gaps) * 0.99)]}


print(json.dumps({"phase": "serving only", **streams(4, time.time() + secs), **memory()}))
b = uuid.uuid4().hex
content = open(data, "rb").read()
body = (f"--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{b}\r\n"
        f"Content-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n\r\n").encode() + content + f"\r\n--{b}--\r\n".encode()
f = post("/v1/files", body, {"content-type": f"multipart/form-data; boundary={b}"})
base = get("/v1/models")["data"][0]["id"]
job = post("/v1/fine_tuning/jobs", json.dumps({"training_file": f["id"], "model": base,
           "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}}).encode())
while get(f"/v1/fine_tuning/jobs/{job['id']}")["status"] == "queued":
    time.sleep(0.2)
r = streams(4, time.time() + secs)
status = get(f"/v1/fine_tuning/jobs/{job['id']}")
events = get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000")["data"]
print(json.dumps({"phase": "job running", **r, "job_status_after": status["status"],
                  "job_steps_done": len(events), **memory()}))
post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", b"{}")
