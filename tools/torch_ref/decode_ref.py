"""Incremental decoding of the PLASA benchmark model in PyTorch, with a
hand-written KV cache, for bench/compare_decode.sh (timing only; the model
and its weights follow plasa_ref.py).

Per layer the cache holds k and v [cap, H, D] and, for a PLASA layer, the
indexer keys [cap, dI], filled in place. One new token at position t:
  dense  softmax(q . K[0..t] / sqrt(D)) V[0..t]
  PLASA  I[s] = sum_j w_j relu(qI_j . kI[s]) for s <= t, the min(k, t+1) largest
         (torch.topk), attention over those rows only (index_select).
Greedy next token (argmax), as bench_decode does.

  /usr/bin/python3 tools/torch_ref/decode_ref.py [--threads N] [--ctx 512,...]
      [--long 8192] [--reps N] [--skip-layer] [--skip-model]

Prints the same markdown tables as bench/bench_decode (layer: one attention
layer, one token at context c; model: tokens/s and ms per token as the context
grows).
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plasa_ref as R  # noqa: E402

H, D, HI, DI = 4, 32, 4, 64


ROPE_MAX = [8192]  # positions the tables cover (main() raises it to the longest context)


def rope_at(x, pos):
    """x [n, H, D] at positions pos..pos+n-1 (the C op's float32 angles; one table
    of ROPE_MAX[0] positions, cached by plasa_ref)."""
    n, h, d = x.shape
    cos, sin = R.rope_tables(ROPE_MAX[0], d)
    cos, sin = cos[pos:pos + n, None, :], sin[pos:pos + n, None, :]
    xp = x.reshape(n, h, d // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(n, h, d)


class Cache:
    def __init__(self, cap, plasa):
        self.k = torch.empty(cap, H, D)
        self.v = torch.empty(cap, H, D)
        self.ki = torch.empty(cap, DI) if plasa else None
        self.n = 0


def dense_attend(q, c):
    t = c.n
    s = torch.einsum("hd,shd->hs", q, c.k[:t]) * (1.0 / math.sqrt(D))
    return torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), c.v[:t])


def plasa_select(qi, w, c, k):
    t = c.n
    dots = qi.reshape(HI, DI) @ c.ki[:t].T  # [HI, t]
    scores = (w[:, None] * torch.relu(dots)).sum(0)
    return torch.topk(scores, min(k, t)).indices


def sparse_attend(q, c, sel):
    ks, vs = c.k.index_select(0, sel), c.v.index_select(0, sel)
    s = torch.einsum("hd,shd->hs", q, ks) * (1.0 / math.sqrt(D))
    return torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vs)


def layer_bench(ctxs, k, reps):
    print(f"\n### One attention layer, one new token (H={H}, D={D}, HI={HI}, dI={DI}, k={k})\n")
    print("| context | dense us (median / min) | PLASA us (median / min) | of which indexer+top-k "
          "| sparse attention | dense / PLASA |\n|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    for c in ctxs:
        cache = Cache(c + reps, True)
        cache.k[:c] = torch.randn(c, H, D, generator=g)
        cache.v[:c] = torch.randn(c, H, D, generator=g)
        cache.ki[:c] = torch.randn(c, DI, generator=g)
        cache.n = c
        td, tp, ti, ts = [], [], [], []
        for _ in range(reps):
            q, kk, vv = (torch.randn(H, D, generator=g) for _ in range(3))
            ki, qi, w = torch.randn(DI, generator=g), torch.randn(HI * DI, generator=g), \
                torch.randn(HI, generator=g)
            t0 = time.perf_counter()
            cache.k[cache.n], cache.v[cache.n], cache.ki[cache.n] = kk, vv, ki
            cache.n += 1
            t1 = time.perf_counter()
            dense_attend(q, cache)
            t2 = time.perf_counter()
            sel = plasa_select(qi, w, cache, k)
            t3 = time.perf_counter()
            sparse_attend(q, cache, sel)
            t4 = time.perf_counter()
            td.append((t2 - t0) * 1e6)
            tp.append(((t1 - t0) + (t4 - t2)) * 1e6)
            ti.append((t3 - t2) * 1e6)
            ts.append((t4 - t3) * 1e6)
        md = [sorted(x)[len(x) // 2] for x in (td, tp, ti, ts)]
        mn = [min(x) for x in (td, tp)]
        print(f"| {c} | {md[0]:.1f} / {mn[0]:.1f} | {md[1]:.1f} / {mn[1]:.1f} | {md[2]:.1f} "
              f"| {md[3]:.1f} | {md[0] / md[1]:.2f} |", flush=True)


def model_run(seq, dense, ctxs):
    ks = [seq] * 4 if dense else [seq, seq // 4, seq // 4, seq // 2]
    cfg = R.Config(vocab=8192, seq=seq, layer_k=ks)
    p = {n: t.detach() for n, t in R.init_params(cfg, 1).items()}
    caches = [Cache(seq, ks[i] < seq) for i in range(cfg.layers)]
    d = cfg.d
    tok = 1
    times = []
    t_start = time.perf_counter()
    with torch.no_grad():
        for n in range(seq):
            a = time.perf_counter()
            h = p["tok_emb"][tok][None, None, :]  # [1, 1, d]
            for i in range(cfg.layers):
                pre = f"layers.{i}."
                c = caches[i]
                x1 = R.rmsnorm(h, p[pre + "attn_norm"])
                qkv = (x1 @ p[pre + "attn.wqkv"])[0]
                q = rope_at(qkv[:, :d].reshape(1, H, D), c.n)[0]
                kk = rope_at(qkv[:, d:2 * d].reshape(1, H, D), c.n)[0]
                c.k[c.n], c.v[c.n] = kk, qkv[0, 2 * d:].reshape(H, D)
                if c.ki is not None:
                    c.ki[c.n] = (x1 @ p[pre + "indexer.wk"])[0, 0]
                c.n += 1
                if c.ki is None:
                    o = dense_attend(q, c)
                else:
                    qi = (x1 @ p[pre + "indexer.wq"])[0, 0]
                    w = (x1 @ p[pre + "indexer.ww"])[0, 0]
                    o = sparse_attend(q, c, plasa_select(qi, w, c, ks[i]))
                h = h + o.reshape(1, 1, d) @ p[pre + "attn.wo"]
                x2 = R.rmsnorm(h, p[pre + "ffn_norm"])
                if cfg.is_moe(i):
                    h = h + R.moe(x2, p, pre, cfg)
                else:
                    h = h + R.swiglu(x2, p[pre + "mlp.gate"], p[pre + "mlp.up"],
                                     p[pre + "mlp.down"])
            logits = R.rmsnorm(h, p["final_norm"]) @ p["lm_head"]
            tok = int(torch.argmax(logits[0, 0]))
            times.append(time.perf_counter() - a)
    tps = seq / (time.perf_counter() - t_start)
    at = []
    for c in ctxs:
        if c > seq:
            at.append(None)
            continue
        lo = max(0, c - 64)  # the median of the 64 tokens before c
        at.append(sorted(times[lo:c])[(c - lo) // 2] * 1e3)
    return tps, at


def model_bench(ctxs, L):
    print("\n### The model, decoding one token at a time (vocabulary 8192, greedy)\n")
    print("| model | attention | tokens/s |" + "".join(f" ms/token at {c} |" for c in ctxs))
    print("|---|---|---:|" + "---:|" * len(ctxs))
    for seq in (128, L):
        for dense in (False, True):
            tps, at = model_run(seq, dense, ctxs)
            name = "long-context" if seq != 128 else "benchmark"
            cells = "".join(" |" if a is None else f" {a:.3f} |" for a in at)
            print(f"| {name} (seq {seq}) | {'dense' if dense else 'PLASA'} | {tps:.1f} |{cells}",
                  flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ctx", default="512,1024,2048,4096,8192")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    ctxs = [int(x) for x in a.ctx.split(",")]
    ROPE_MAX[0] = max([a.long, 128] + ctxs)
    load = os.getloadavg()
    print(f"decode_ref: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not a.skip_layer:
        layer_bench(ctxs, a.k, a.reps)
    if not a.skip_model:
        model_bench(ctxs, a.long)


if __name__ == "__main__":
    main()
