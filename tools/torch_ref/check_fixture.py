#!/usr/bin/python3
"""Checks the parity fixtures against the reference and probes their robustness.

  1. the reference reproduces every stored expectation (bit for bit on the machine that
     wrote them; to float32 noise elsewhere);
  2. "other implementations": the reference with every matrix product summed in another
     order (K split into 4 chunks, added last to first), and with every initial weight
     perturbed by a relative 1e-6 (3 draws; --noise, --draws), must make exactly the same discrete
     decisions (top-k sets, MoE top-2 sets) at every checkpoint of the 3 AdamW steps;
     the script prints how far their numbers move, i.e. the tolerances a float32 C
     implementation should be held to.

Usage: /usr/bin/python3 tools/torch_ref/check_fixture.py [--dir tests/data]
"""

import argparse
import os
import sys
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plasa_ref as R  # noqa: E402

STEPS = 3


def mm_ksplit(a, b):
    K = a.shape[-1]
    cuts = [0, K // 4, K // 2, 3 * K // 4, K]
    out = None
    for i in reversed(range(4)):
        part = a[..., cuts[i]:cuts[i + 1]] @ b[..., cuts[i]:cuts[i + 1], :]
        out = part if out is None else out + part
    return out


def trajectory(init, cfg, inputs, targets):
    """logits, loss, grads at init; per checkpoint the decisions; the 3 step losses, the
    grad norms and the final loss."""
    p = OrderedDict((n, t.detach().clone().requires_grad_(True)) for n, t in init.items())
    logits = R.forward(p, cfg, inputs)
    loss = R.loss_fn(logits, targets)
    loss.backward()
    grads = OrderedDict((n, t.grad.clone() if t.grad is not None else torch.zeros_like(t))
                        for n, t in p.items())
    p = OrderedDict((n, t.detach().clone().requires_grad_(True)) for n, t in init.items())
    opt = R.make_optimizer(p)
    decisions, losses, norms = [], [], []
    for c in range(STEPS + 1):
        aux = {}
        with torch.no_grad():
            losses.append(R.loss_fn(R.forward(p, cfg, inputs, aux=aux), targets).item())
        sel = [m for (_, _, _, m) in aux.get("indexer", [])]
        rt = [torch.sort(pr, dim=-1, descending=True, stable=True).indices[:, :2].sort(-1).values
              for pr in aux.get("router", [])]
        decisions.append((sel, rt))
        if c < STEPS:
            norms.append(R.train_step(p, opt, cfg, inputs, targets)[1])
    return dict(logits=logits.detach(), loss=loss.item(), grads=grads, decisions=decisions,
                losses=losses[:STEPS], final=losses[STEPS], norms=norms)


def same_decisions(a, b):
    for (sa, ra), (sb, rb) in zip(a, b):
        if any(not torch.equal(x, y) for x, y in zip(sa, sb)):
            return False
        if any(not torch.equal(x, y) for x, y in zip(ra, rb)):
            return False
    return True


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    m = b.abs().max().item()
    d = (a - b).abs().max().item()
    return d / m if m > 0 else d


def compare(tag, got, ts):
    gr = max(rel(got["grads"][n], ts["grad." + n]) for n in got["grads"]
             if ts["grad." + n].abs().max() > 0)
    zero_ok = all(torch.equal(got["grads"][n], ts["grad." + n]) for n in got["grads"]
                  if not ts["grad." + n].abs().max() > 0)
    print(f"  {tag:<34} logits {rel(got['logits'], ts['expect.logits']):.1e}  "
          f"loss {rel(got['loss'], ts['expect.loss']):.1e}  grads {gr:.1e}"
          f"{'' if zero_ok else ' (ZERO GRADS DIFFER)'}  "
          f"adamw {rel(got['losses'], ts['expect.adamw_losses']):.1e}  "
          f"norms {rel(got['norms'], ts['expect.adamw_grad_norms']):.1e}  "
          f"final {rel(got['final'], ts['expect.adamw_final_loss']):.1e}")
    return zero_ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests",
                                                  "data"))
    ap.add_argument("--noise", default="1e-6,1e-5", help="relative weight noise levels (list)")
    ap.add_argument("--draws", type=int, default=3, help="perturbed runs per noise level")
    args = ap.parse_args()
    wts, _ = R.load_safetensors(os.path.join(args.dir, "parity_plasa.safetensors"))
    ok = True
    for name in ("plasa", "dense"):
        ts, meta = R.load_safetensors(os.path.join(args.dir, f"parity_{name}.safetensors"))
        cfg = R.Config(vocab=int(meta["vocab"]), seq=int(meta["seq"]),
                       layer_k=[int(k) for k in meta["layer_k"].split(",")])
        init = OrderedDict((n, wts[n]) for n, _, _ in R.param_specs(cfg))
        inputs, targets = ts["batch.inputs"], ts["batch.targets"]
        print(f"parity_{name}: layer_k {cfg.layer_k}")
        R.mm = lambda a, b: a @ b
        base = trajectory(init, cfg, inputs, targets)
        ok &= compare("reference (as written)", base, ts)
        exact = torch.equal(base["logits"], ts["expect.logits"])
        print(f"    logits bit-identical to the file: {exact}")
        if name == "plasa":
            sparse = [i for i, k in enumerate(cfg.layer_k) if k < cfg.seq]
            for i, m in zip(sparse, base["decisions"][0][0]):
                want = ts[f"expect.topk.layers.{i}"]
                got = torch.full_like(want, -1)
                for b in range(m.shape[0]):
                    for t in range(m.shape[1]):
                        s = m[b, t].nonzero().flatten()
                        got[b, t, :len(s)] = s.to(torch.int32)
                same = torch.equal(got, want)
                ok &= same
                print(f"    expect.topk.layers.{i} reproduced: {same}")
        variants = [("summation order (K split)", None, None, mm_ksplit)]
        for eps in [float(x) for x in args.noise.split(",")]:
            for s in range(args.draws):
                variants.append((f"weights * (1 + {eps:g} N(0,1)) #{s}", s, eps, None))
        for tag, seed, eps, mmf in variants:
            R.mm = mmf if mmf else (lambda a, b: a @ b)
            w = init
            if seed is not None:
                g = torch.Generator().manual_seed(seed)
                w = OrderedDict((n, t * (1 + eps * torch.randn(t.shape, generator=g)))
                                for n, t in init.items())
            got = trajectory(w, cfg, inputs, targets)
            same = same_decisions(got["decisions"], base["decisions"])
            ok &= same
            compare(tag + ("" if same else " DECISIONS DIFFER"), got, ts)
        R.mm = lambda a, b: a @ b
    print("all decisions robust" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
