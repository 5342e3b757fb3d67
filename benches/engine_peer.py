#!/usr/bin/env python3
"""Engine benchmarks against a running server (ours or llama.cpp's), stdlib only; one JSON line.

  engine_peer.py URL prefill [--tokens 3000] [--runs 3]
      a prompt of N token ids (different each run, so no prompt cache helps), max_tokens 1:
      seconds to the answer (= prefill), mean and each run.
  engine_peer.py URL itl [--tokens 2000] [--streams 8]
      N streams decode; once each has 5 tokens a prompt of N tokens arrives; the streams'
      inter-token gaps while it prefills: p50, p99, max; and the prompt's time to answer.
  engine_peer.py URL concurrent [--tokens 32] [--streams 8] [--runs 3] [--max-tokens 129]
      --streams streams at once, --runs requests each: completion tokens/s over the wall time.
  engine_peer.py URL ttft [--tokens 500] [--requests 16] [--model ADAPTER]
      requests one after another, all sharing an N-token system prompt (then a short question
      of their own): time to first token of each, mean of the first and of the rest.

`--flavor llamacpp` for llama.cpp's server (the same OpenAI routes; `--model` is ignored there).
"""
import argparse, json, statistics, sys, threading, time, urllib.request


def post(url, body, stream=False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


VOCAB = 40000


def ids(n, salt):
    # Ordinary vocabulary ids, different for each salt from the first token on.
    low = min(1000, VOCAB // 4)
    return [low + (i * 7919 + salt * 104729) % (VOCAB - low) for i in range(n)]


def prefill(a):
    runs = []
    for r in range(a.runs):
        t = time.perf_counter()
        out = json.load(post(a.url + "/v1/completions",
                             {"prompt": ids(a.tokens, 1000 + r + int(t) % 1000), "max_tokens": 1,
                              "temperature": 0, **model(a)}))
        runs.append(time.perf_counter() - t)
        assert out["usage"]["prompt_tokens"] >= a.tokens, out["usage"]
    return {"test": "prefill", "tokens": a.tokens, "mean_s": statistics.mean(runs), "runs_s": runs}


def model(a):
    return {"model": a.model} if a.model and a.flavor != "llamacpp" else {}


def stream_tokens(a, body, stamps, stop):
    resp = post(a.url + "/v1/chat/completions", {**body, "stream": True})
    for line in resp:
        if stop.is_set():
            break
        line = line.decode().strip()
        if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
            stamps.append(time.perf_counter())
        if line == "data: [DONE]":
            break


def itl(a):
    stop = threading.Event()
    stamps = [[] for _ in range(a.streams)]
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, **model(a)}
    threads = [threading.Thread(target=stream_tokens, args=(a, body, s, stop), daemon=True)
               for s in stamps]
    for t in threads:
        t.start()
    while any(len(s) < 5 for s in stamps):
        time.sleep(0.01)
    began = time.perf_counter()
    json.load(post(a.url + "/v1/completions", {"prompt": ids(a.tokens, int(began) % 997),
                                               "max_tokens": 1, "temperature": 0, **model(a)}))
    ended = time.perf_counter()
    time.sleep(0.5)
    stop.set()
    gaps = []
    for s in stamps:
        during = [t for t in s if began <= t <= ended]
        edges = [began] + during + [ended]
        gaps += [y - x for x, y in zip(edges, edges[1:])]
    gaps.sort()
    q = lambda p: gaps[min(len(gaps) - 1, int(p * len(gaps)))]
    return {"test": "itl", "streams": a.streams, "prompt_tokens": a.tokens,
            "prompt_s": ended - began, "gap_p50_s": q(0.5), "gap_p99_s": q(0.99),
            "gap_max_s": gaps[-1], "stream_tokens_during": sum(len([t for t in s if began <= t <= ended]) for s in stamps)}


def ttft(a):
    salt = int(time.time()) % 9973
    system = " ".join(f"rule{(i * 31 + salt) % 997}" for i in range(a.tokens // 4))  # ~4 tokens a word
    times = []
    for r in range(a.requests):
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"Question {r}: what is rule {r}?"}],
                "max_tokens": 1, "temperature": 0, "stream": True, **model(a)}
        t = time.perf_counter()
        resp = post(a.url + "/v1/chat/completions", body)
        first = None
        for line in resp:
            line = line.decode().strip()
            if first is None and line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - t
            if line == "data: [DONE]":
                break
        times.append(first if first is not None else time.perf_counter() - t)
    return {"test": "ttft", "requests": a.requests, "system_words": a.tokens // 4,
            "first_s": times[0], "rest_mean_s": statistics.mean(times[1:]), "all_s": times}


def decode(a):
    """One stream, a prompt of 64 and then of N token ids: decode tokens/s after the first token."""
    rates = {}
    for ctx in (64, a.tokens):
        got = []
        # A random-weight model may answer in bytes that are not whole UTF-8 characters, which
        # llama.cpp's server holds back (no events to time): such a run is redone with another
        # prompt.
        for r in range(3 * a.runs):
            if len(got) == a.runs:
                break
            body = {"prompt": ids(ctx, 3000 + r + int(time.time()) % 1000), "max_tokens": a.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, **model(a)}
            stamps = []
            for line in post(a.url + "/v1/completions", body):
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    stamps.append(time.perf_counter())
                if line == "data: [DONE]":
                    break
            if len(stamps) < a.max_tokens // 2:
                continue
            got.append((len(stamps) - 2) / (stamps[-2] - stamps[0]))  # the last event is usage/finish
        rates[ctx] = statistics.median(got)
    return {"test": "decode", "tokens_per_s": {str(k): v for k, v in rates.items()},
            "ratio": rates[a.tokens] / rates[64]}


def concurrent(a):
    """`--streams` streams at once, each a prompt of N token ids then `--max-tokens` tokens (no
    end of sequence), `--runs` requests per stream back to back: tokens per second over the
    wall time (the concurrency-8 decode figure when N is short)."""
    counts, lock = [], threading.Lock()

    def adapter(s):
        """`--adapters a,b,…`: stream s asks for adapter s mod their count (llama.cpp: its `lora`
        ids in the order of `--lora`, the others at scale 0)."""
        if not a.adapters:
            return model(a)
        names = a.adapters.split(",")
        i = s % len(names)
        if a.flavor == "llamacpp":
            return {"lora": [{"id": j, "scale": 1.0 if j == i else 0.0} for j in range(len(names))]}
        return {"model": names[i]}

    def stream(s):
        for r in range(a.runs):
            body = {"prompt": ids(a.tokens, 5000 + 97 * s + r + int(time.time()) % 1000),
                    "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, **adapter(s)}
            out = json.load(post(a.url + "/v1/completions", body))
            with lock:
                counts.append(out["usage"]["completion_tokens"])

    t = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(s,)) for s in range(a.streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {"test": "mixed" if a.adapters else "concurrent", "streams": a.streams,
            "tokens": sum(counts), "tokens_per_s": sum(counts) / wall}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("test", choices=["prefill", "itl", "ttft", "decode", "concurrent"])
    p.add_argument("--tokens", type=int)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--model")
    p.add_argument("--adapters", help="concurrent: adapter names, one per stream in turn")
    p.add_argument("--max-tokens", type=int, default=129, help="decode: tokens per run")
    p.add_argument("--vocab", type=int, default=40000, help="prompt ids stay below this")
    p.add_argument("--flavor", default="ours")
    a = p.parse_args()
    a.url = a.url.rstrip("/")
    global VOCAB
    VOCAB = a.vocab
    a.tokens = a.tokens or {"prefill": 3000, "itl": 2000, "ttft": 500, "decode": 2048,
                            "concurrent": 32}[a.test]
    out = {"prefill": prefill, "itl": itl, "ttft": ttft, "decode": decode,
           "concurrent": concurrent}[a.test](a)
    out["flavor"] = a.flavor
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
