#!/usr/bin/python3
"""Checks of the reference itself (not part of the C test suite):
causal top-k rules, causality of the whole model, k >= L == dense, the indexer's
zero gradient, AdamW decaying the indexer, safetensors round trip, Philox windows.
Run: /usr/bin/python3 tools/torch_ref/selftest.py"""

import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plasa_ref as R  # noqa: E402
import train_ref as T  # noqa: E402


def naive_topk(row, k):
    """Row of scores for s = 0..t: the k_t largest, ties to the smaller s (plain Python)."""
    idx = sorted(range(len(row)), key=lambda s: (-row[s], s))
    return sorted(idx[:min(k, len(row))])


def test_topk_rules():
    g = torch.Generator().manual_seed(0)
    L = 40
    # many exact ties (quantised scores), +0/-0 mixed
    I = (torch.randint(-3, 4, (2, L, L), generator=g).float())
    I[I == 0] = torch.where(torch.rand(int((I == 0).sum()), generator=g) < 0.5,
                            torch.tensor(0.0), torch.tensor(-0.0))
    I = I.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    for k in (1, 5, 17, 39, 40, 64):
        m = R.causal_topk_mask(I, k)
        for b in range(2):
            for t in range(L):
                want = naive_topk(I[b, t, :t + 1].tolist(), k)
                got = m[b, t].nonzero().flatten().tolist()
                assert got == want, (k, b, t, got, want)
    print("ok top-k: k_t = min(k, t+1), ties (incl. +0/-0) to the smaller s, never s > t")


def test_causality_and_dense():
    cfg = R.Config(vocab=64, layer_k=[128, 32, 32, 64])
    p = R.init_params(cfg, 3)
    g = torch.Generator().manual_seed(1)
    inp = torch.randint(0, 64, (2, 128), generator=g, dtype=torch.int32)
    with torch.no_grad():
        aux0 = {}
        base = R.forward(p, cfg, inp, aux=aux0)
        worst = 0.0
        for s in (1, 40, 77, 127):
            x = inp.clone()
            x[:, s] = (x[:, s] + 5) % 64
            aux = {}
            out = R.forward(p, cfg, x, aux=aux)
            for (_, _, _, m0), (_, _, _, m1) in zip(aux0["indexer"], aux["indexer"]):
                assert torch.equal(m0[:, :s], m1[:, :s]), "selection of an earlier row changed"
            worst = max(worst, (out[:, :s] - base[:, :s]).abs().max().item())
            assert (out[:, s:] - base[:, s:]).abs().max().item() > 1e-3
        # Earlier outputs are equal up to rounding: an expert's GEMM has a different
        # number of rows when a later token routes elsewhere (not a leak).
        assert worst < 1e-5, worst
        # k >= L through the sparse path == dense causal attention
        I = torch.randn(2, 128, 128, generator=g).masked_fill(
            ~torch.ones(128, 128, dtype=torch.bool).tril(), float("-inf"))
        assert torch.equal(R.causal_topk_mask(I, 128),
                           torch.ones(128, 128, dtype=torch.bool).tril().expand(2, 128, 128))
        dense = R.forward(p, R.Config(vocab=64, layer_k=[128] * 4), inp)
        big = R.forward(p, R.Config(vocab=64, layer_k=[500] * 4), inp)
        assert torch.equal(dense, big)
    print(f"ok causality: selections of rows < s unchanged, outputs within {worst:.1e}; "
          "k >= L is dense")


def test_grads_and_adamw():
    cfg = R.Config(vocab=64)
    p = R.init_params(cfg, 4)
    g = torch.Generator().manual_seed(2)
    inp = torch.randint(0, 64, (2, 128), generator=g, dtype=torch.int32)
    tgt = torch.randint(0, 64, (2, 128), generator=g, dtype=torch.int32)
    before = {n: t.detach().clone() for n, t in p.items()}
    opt = R.make_optimizer(p)
    R.train_step(p, opt, cfg, inp, tgt)
    for n, t in p.items():
        if R.is_indexer(n):
            assert torch.equal(t.grad, torch.zeros_like(t)), n
            assert torch.allclose(t.detach(), before[n] * (1 - 3e-4 * 0.1), rtol=0, atol=1e-9), n
        else:
            assert t.grad.abs().max() > 0, n
    # a float64 gradient check of a few entries through the whole model (dense schedule:
    # no discrete top-k decisions; MoE routing is piecewise smooth)
    cfg64 = R.Config(vocab=64, layer_k=[128] * 4)
    p64 = {n: t.detach().double().requires_grad_(True) for n, t in R.init_params(cfg64, 5).items()}
    loss = R.loss_fn(R.forward(p64, cfg64, inp), tgt)
    loss.backward()
    for n in ("layers.0.attn.wqkv", "layers.1.moe.up", "layers.3.moe.router", "lm_head",
              "layers.2.ffn_norm"):
        flat = p64[n].detach().view(-1)
        i = int(p64[n].grad.abs().view(-1).argmax())
        h = 1e-6
        with torch.no_grad():
            old = flat[i].item()
            flat[i] = old + h
            lp = R.loss_fn(R.forward(p64, cfg64, inp), tgt).item()
            flat[i] = old - h
            lm = R.loss_fn(R.forward(p64, cfg64, inp), tgt).item()
            flat[i] = old
        num, ana = (lp - lm) / (2 * h), p64[n].grad.view(-1)[i].item()
        assert abs(num - ana) <= 1e-6 * max(1.0, abs(ana)) + 1e-8, (n, num, ana)
    print("ok gradients: indexer exactly 0 and only decayed; finite differences agree")


def test_safetensors_and_windows():
    t = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.int32), "s": torch.randn(1)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        R.save_safetensors(path, t, {"k": "v"})
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        assert (8 + n) % 8 == 0
        back, meta = R.load_safetensors(path)
        assert meta == {"k": "v"} and list(back) == list(t)
        for k in t:
            assert torch.equal(back[k], t[k])
    # Philox windows: the values of the C function pl_philox(seed ^ BATCH_STREAM, counter)
    w = T.philox(42 ^ T.BATCH_STREAM, 1)
    assert w == (1420569729, 3972537693, 1345498822, 2785993697), w
    win = T.Windows("sequential", 1000, 128, 2, 0)
    assert [win.start(s, b) for s in range(4) for b in range(2)] == \
        [0, 128, 256, 384, 512, 640, 768, 24]
    print("ok safetensors round trip, Philox (C values), sequential windows")


if __name__ == "__main__":
    torch.set_num_threads(1)
    test_topk_rules()
    test_causality_and_dense()
    test_grads_and_adamw()
    test_safetensors_and_windows()
    print("all ok")
