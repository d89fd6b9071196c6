#!/usr/bin/python3
"""How far do two float32 implementations of the same training run drift apart, and
why? Runs the reference in lockstep, from the same weights and windows, dropout 0:

  f32     the reference as train_ref.py runs it;
  ksplit  the same in float32 with every matrix product summed in another order
          (K split in 4 parts, added last to first; as check_fixture.py): a stand-in
          for any other correct float32 implementation, such as libplasa;
  f64     the same in float64;
  clip64  float32, but the gradient norm of the clipping summed in float64 and the
          coefficient rounded once to float32 (as libplasa's pl_clip_grad_norm;
          torch 1.13's clip_grad_norm_ computes the norms in float32).

Per step it prints/writes the training loss of each run, and the discrete decisions
that rounding alone can flip at that step: the f32 run's weights are also evaluated in
float64 ("shadow"), and the sparse-attention rows whose top-k key set differs, and the
tokens whose MoE top-2 expert set differs, between float32 and float64 arithmetic on the
SAME weights are counted. A nonzero count means a near tie at that step: two float32
implementations can take different branches there, after which their weights differ
by more than rounding. With --c-csv (plasa-train's CSV of the same run) it adds the
libplasa loss and its relative difference from the f32 run.

  /usr/bin/python3 tools/torch_ref/drift.py --train train.bin --init init.safetensors \
      [--steps 200] [--seed 42] [--threads 1] [--c-csv plasa.csv] [--csv drift.csv]
"""

import argparse
import csv
import os
import sys
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plasa_ref as R  # noqa: E402
import train_ref as T  # noqa: E402
from check_fixture import mm_ksplit  # noqa: E402

MM_PLAIN = R.mm


def decisions(aux):
    sel = [m for (_, _, _, m) in aux.get("indexer", [])]
    rt = [torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :2].sort(-1).values
          for p in aux.get("router", [])]
    return sel, rt


def zero_ties(aux):
    """Sparse rows whose top-k boundary falls inside a block of exact-zero scores: the k-th
    and (k+1)-th largest I of the row are both 0 (every ReLU argument of those keys < 0).
    Both implementations give such ties to the smaller s; they are only dangerous if a
    ReLU argument is within rounding of 0 (then the shadow count sees a flip)."""
    n = 0
    for k, I, _, _ in aux.get("indexer", []):
        L = I.shape[-1]
        v = torch.sort(I, dim=-1, descending=True).values[:, k:, :]  # rows t >= k
        n += int(((v[..., k - 1] == 0) & (v[..., k] == 0)).sum()) if L > k else 0
    return n


def flips(a, b):
    """(rows whose top-k set differs, tokens whose top-2 expert set differs)."""
    rows = sum(int((x != y).any(-1).sum()) for x, y in zip(a[0], b[0]))
    toks = sum(int((x != y).any(-1).sum()) for x, y in zip(a[1], b[1]))
    return rows, toks


def step(params, opt, cfg, inp, tgt, mm, clip=1.0, clip64=False):
    """train_ref's step (R.train_step) with the decisions of its forward pass and the
    number of exact-zero boundary ties."""
    R.mm = mm
    opt.zero_grad(set_to_none=True)
    aux = {}
    loss = R.loss_fn(R.forward(params, cfg, inp, 0.0, aux), tgt)
    loss.backward()
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if clip64:
        R.clip_grad_norm_f64(params, clip)
    else:
        torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    opt.step()
    R.mm = MM_PLAIN
    return loss.item(), decisions(aux), zero_ties(aux)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--c-csv", help="plasa-train --csv of the same run (1-based steps)")
    ap.add_argument("--csv", help="write the per-step table here")
    args = ap.parse_args()
    T.set_threads(args.threads)
    tok = T.read_bin(args.train)
    cfg = R.Config(vocab=R.vocab_of(args.init))
    base, _ = R.load_params(args.init, cfg)
    runs = OrderedDict()
    for name, dt, mm in (("f32", torch.float32, MM_PLAIN), ("ksplit", torch.float32, mm_ksplit),
                         ("f64", torch.float64, MM_PLAIN), ("clip64", torch.float32, MM_PLAIN)):
        p = OrderedDict((n, t.detach().to(dt).clone().requires_grad_(True)) for n, t in base.items())
        runs[name] = (p, R.make_optimizer(p), mm, name == "clip64")
    cl = {}
    if args.c_csv:
        with open(args.c_csv) as f:
            cl = {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f)}
    win = T.Windows("philox", len(tok), cfg.seq, 2, args.seed)
    out = open(args.csv, "w") if args.csv else None
    head = ("step,f32,ksplit,f64,clip64,libplasa,rel_ksplit,rel_f64,rel_clip64,rel_libplasa,"
            "libplasa_vs_clip64,shadow_topk_rows,shadow_router_tokens,ksplit_topk_rows,"
            "ksplit_router_tokens,zero_tie_rows")
    if out:
        out.write(head + "\n")
    print(head)
    for s in range(args.steps):
        inp, tgt = win.batch(tok, s)
        p32 = runs["f32"][0]
        # the f32 weights of this step, evaluated in float64: near ties of this step
        with torch.no_grad():
            aux = {}
            R.forward(OrderedDict((n, t.detach().double()) for n, t in p32.items()), cfg, inp, 0.0,
                      aux)
            d64 = decisions(aux)
        loss, dec, zt = {}, {}, {}
        for name, (p, opt, mm, c64) in runs.items():
            loss[name], dec[name], zt[name] = step(p, opt, cfg, inp, tgt, mm, clip64=c64)
        sh = flips(dec["f32"], d64)
        ks = flips(dec["f32"], dec["ksplit"])
        c = cl.get(s + 1, float("nan"))
        f = loss["f32"]
        row = [s + 1, f, loss["ksplit"], loss["f64"], loss["clip64"], c,
               abs(loss["ksplit"] - f) / f, abs(loss["f64"] - f) / f,
               abs(loss["clip64"] - f) / f, abs(c - f) / f,
               abs(c - loss["clip64"]) / loss["clip64"], sh[0], sh[1], ks[0], ks[1], zt["f32"]]
        line = ",".join(f"{v:.9g}" if isinstance(v, float) else str(v) for v in row[:6]) + "," + \
            ",".join(f"{v:.3e}" if isinstance(v, float) else str(v) for v in row[6:])
        if out:
            out.write(line + "\n")
            out.flush()
        print(line, flush=True)
    if out:
        out.close()


if __name__ == "__main__":
    main()
