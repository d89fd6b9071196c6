"""PyTorch reference of the libplasa PLASA benchmark model (docs/model.md),
with CAUSAL top-k selection, written for parity checks against the C library.

Conventions (shared with the C side; a safetensors file loads in both):
  * weights are stored [in, out] and used as y = x @ W (the transpose of
    torch.nn.Linear.weight);
  * parameter names and shapes: see param_specs();
  * everything is float32; the indexer and the top-k choice carry no gradient
    (their weights get an all-zero gradient, so AdamW only decays them).

Runs with Debian's python3-torch (1.13) under /usr/bin/python3 (numpy, a
dependency of python3-torch, is used only to turn tensors into bytes).
"""

import json
import math
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

if sys.byteorder != "little":
    raise ImportError("plasa_ref: the safetensors code assumes a little-endian host")

NORM_EPS = 1e-6
ROPE_BASE = 10000.0
MOE_LAYERS = (1, 3)  # the others have a dense SwiGLU MLP
SCHEDULES = ("progressive", "dense", "uniform", "dense_to_sparse", "aggressive_middle")


# --------------------------------------------------------------------------- config


@dataclass
class Config:
    vocab: int
    seq: int = 128
    layers: int = 4
    d: int = 128
    heads: int = 4
    ffn: int = 512
    experts: int = 4
    expert_ffn: int = 256
    top_experts: int = 2
    idx_heads: int = 4
    idx_dim: int = 64
    layer_k: List[int] = field(default_factory=list)
    dropout: float = 0.0

    def __post_init__(self):
        if not self.layer_k:
            self.layer_k = schedule_k("progressive", self.layers, self.seq)
        if len(self.layer_k) != self.layers:
            raise ValueError("layer_k needs one k per layer")
        if self.d % self.heads or (self.d // self.heads) % 2:
            raise ValueError("d must split into heads of even width")

    @property
    def head_dim(self):
        return self.d // self.heads

    def is_moe(self, i):
        return i in MOE_LAYERS


def _round_half_away(x):
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def schedule_k(spec, layers, L):
    """Per-layer k. spec is a schedule name, or a list / comma-separated string
    of k values (one per layer, or one for all). Same rules as the C trainer
    (examples/plasa-train/schedule.c): k = round(f * L) clamped to [1, L] with
      dense f=1; uniform 1/2; progressive first 1, last 1/2, others 1/4;
      dense_to_sparse 1 - 0.75 i/(n-1); aggressive_middle first/last 1, others 1/8.
    """
    if isinstance(spec, (list, tuple)):
        ks = [int(k) for k in spec]
    elif isinstance(spec, str) and spec not in SCHEDULES:
        ks = [int(k) for k in spec.split(",")]
    else:
        ks = []
        for i in range(layers):
            first, last = i == 0, (i == layers - 1 and layers > 1)
            f = 1.0
            if spec == "uniform":
                f = 0.5
            elif spec == "progressive":
                f = 1.0 if first else 0.5 if last else 0.25
            elif spec == "dense_to_sparse":
                f = 1.0 - 0.75 * i / (layers - 1) if layers > 1 else 1.0
            elif spec == "aggressive_middle":
                f = 1.0 if first or last else 0.125
            ks.append(min(max(_round_half_away(f * L), 1), L))
        return ks
    if len(ks) == 1:
        ks = ks * layers
    if len(ks) != layers or any(k < 1 for k in ks):
        raise ValueError(f"bad k list {spec!r} for {layers} layers")
    return [min(k, L) for k in ks]


# --------------------------------------------------------------------------- parameters


def param_specs(cfg: Config):
    """Ordered (name, shape, init) with init = ('uniform', fan_in) | ('normal',) | ('zeros',).
    The order is the order of the safetensors files and of the random draws."""
    d, V = cfg.d, cfg.vocab
    specs = [("tok_emb", [V, d], ("normal",))]
    for i in range(cfg.layers):
        p = f"layers.{i}."
        specs += [
            (p + "attn_norm", [d], ("zeros",)),
            (p + "attn.wqkv", [d, 3 * d], ("uniform", d)),
            (p + "attn.wo", [d, d], ("uniform", d)),
            (p + "indexer.wq", [d, cfg.idx_heads * cfg.idx_dim], ("uniform", d)),
            (p + "indexer.wk", [d, cfg.idx_dim], ("uniform", d)),
            (p + "indexer.ww", [d, cfg.idx_heads], ("uniform", d)),
            (p + "ffn_norm", [d], ("zeros",)),
        ]
        if cfg.is_moe(i):
            E, Fe = cfg.experts, cfg.expert_ffn
            specs += [
                (p + "moe.router", [d, E], ("uniform", d)),
                (p + "moe.gate", [E, d, Fe], ("uniform", d)),
                (p + "moe.up", [E, d, Fe], ("uniform", d)),
                (p + "moe.down", [E, Fe, d], ("uniform", Fe)),
            ]
        else:
            specs += [
                (p + "mlp.gate", [d, cfg.ffn], ("uniform", d)),
                (p + "mlp.up", [d, cfg.ffn], ("uniform", d)),
                (p + "mlp.down", [cfg.ffn, d], ("uniform", cfg.ffn)),
            ]
    specs += [("final_norm", [d], ("zeros",)), ("lm_head", [d, V], ("uniform", d))]
    return specs


def init_params(cfg: Config, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """PyTorch-default-like init from torch.Generator(seed), drawn in param_specs order:
    Linear-like U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embedding N(0, 1), norms 0.
    (The C library draws with Philox; the two inits are statistically alike, not equal:
    exchange weights through safetensors for parity.)"""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, shape, init in param_specs(cfg):
        if init[0] == "normal":
            t = torch.randn(shape, generator=g, dtype=torch.float32)
        elif init[0] == "zeros":
            t = torch.zeros(shape, dtype=torch.float32)
        else:
            bound = 1.0 / math.sqrt(init[1])
            t = (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
        out[name] = t.requires_grad_(True)
    return out


def check_params(cfg: Config, params: Dict[str, torch.Tensor]):
    want = {n: s for n, s, _ in param_specs(cfg)}
    missing = [n for n in want if n not in params]
    if missing:
        raise ValueError(f"missing parameters: {missing[:5]}")
    for n, s in want.items():
        if list(params[n].shape) != s:
            raise ValueError(f"{n}: shape {list(params[n].shape)}, want {s}")


def is_indexer(name: str) -> bool:
    return ".indexer." in name


# --------------------------------------------------------------------------- ops


def mm(a, b):
    """Every matrix product of the model goes through here (check_fixture.py swaps in a
    product with another summation order to imitate a different float32 implementation)."""
    return a @ b


def rmsnorm(x, w):
    """y = x / sqrt(mean(x^2) + 1e-6) * (1 + w), float32 (as Qwen3NextRMSNorm)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return (x * r) * (1.0 + w)


_rope_cache = {}


def rope_tables(L, D):
    """cos/sin [L, D/2] as the C op computes them: inv = 1 / (float)pow(base, 2i/D)
    in float32, angle = (float)pos * inv in float32, cos/sin in double, rounded."""
    key = (L, D)
    if key not in _rope_cache:
        e = torch.arange(0, D, 2, dtype=torch.float32) / float(D)  # float32 (2i)/D
        inv = torch.tensor([1.0], dtype=torch.float32) / torch.tensor(
            [math.pow(ROPE_BASE, float(v)) for v in e.tolist()], dtype=torch.float32)
        ang = torch.arange(L, dtype=torch.float32)[:, None] * inv[None, :]  # float32
        _rope_cache[key] = (torch.cos(ang.double()).float(), torch.sin(ang.double()).float())
    return _rope_cache[key]


def rope(x):
    """x [B, H, L, D]: rotate adjacent pairs (x[2i], x[2i+1]) by pos * 10000^(-2i/D)."""
    B, H, L, D = x.shape
    cos, sin = rope_tables(L, D)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    xp = x.reshape(B, H, L, D // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack((y0, y1), dim=-1).reshape(B, H, L, D)


def indexer_scores(x1, wq, wk, ww, n_heads):
    """Lightning indexer I[b,t,s] = sum_j w[b,t,j] relu(q[b,t,j,:] . k[b,s,:]) for s <= t,
    -inf for s > t. No gradient (computed on detached inputs). Returns (I, terms) where
    terms = (q, k, w) for diagnostics."""
    with torch.no_grad():
        x1 = x1.detach()
        B, L, _ = x1.shape
        q = mm(x1, wq).reshape(B, L, n_heads, -1)  # [B, L, HI, dI]
        k = mm(x1, wk)  # [B, L, dI]
        w = mm(x1, ww)  # [B, L, HI]
        dots = mm(q.reshape(B, L * n_heads, -1), k.transpose(1, 2)).reshape(B, L, n_heads, L)
        I = (w[..., None] * torch.relu(dots)).sum(2)  # [B, L, L], sum over heads j in order
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        I = I.masked_fill(~causal, float("-inf"))
    return I, (q, k, w, dots)


def causal_topk_mask(I, k):
    """Bool [B, L, L]: for row t the k_t = min(k, t+1) keys s <= t with the largest
    I[b,t,s], ties to the smaller s (stable descending sort; -0.0 == +0.0)."""
    B, L, _ = I.shape
    order = torch.sort(I, dim=-1, descending=True, stable=True).indices
    sel = torch.zeros(B, L, L, dtype=torch.bool)
    sel.scatter_(-1, order[..., :k], True)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return sel & causal  # rows t < k: the -inf (future) entries sort last and are masked off


def attention(x1, p, pre, cfg: Config, k, dropout, aux=None):
    B, L, d = x1.shape
    H, D = cfg.heads, cfg.head_dim
    qkv = mm(x1, p[pre + "attn.wqkv"])
    q, kk, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    q = q.reshape(B, L, H, D).transpose(1, 2)
    kk = kk.reshape(B, L, H, D).transpose(1, 2)
    v = v.reshape(B, L, H, D).transpose(1, 2)
    q, kk = rope(q), rope(kk)
    if k >= L:
        mask = torch.ones(L, L, dtype=torch.bool).tril().expand(B, L, L)
    else:
        I, terms = indexer_scores(x1, p[pre + "indexer.wq"], p[pre + "indexer.wk"],
                                  p[pre + "indexer.ww"], cfg.idx_heads)
        mask = causal_topk_mask(I, k)
        if aux is not None:
            aux.setdefault("indexer", []).append((k, I, terms, mask))
    s = mm(q, kk.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    s = s.masked_fill(~mask[:, None], float("-inf"))
    a = torch.softmax(s, dim=-1)
    if dropout > 0:
        a = F.dropout(a, p=dropout, training=True)
    o = mm(a, v).transpose(1, 2).reshape(B, L, d)
    return mm(o, p[pre + "attn.wo"])


def swiglu(x, gate, up, down):
    return mm(F.silu(mm(x, gate)) * mm(x, up), down)


def moe(x, p, pre, cfg: Config, aux=None):
    """Router softmax (float32) over E experts, top-2 (ties to the lower index), the two
    weights divided by their sum, output = sum_slot w * expert(x). No shared expert."""
    B, L, d = x.shape
    flat = x.reshape(B * L, d)
    probs = torch.softmax(mm(flat, p[pre + "moe.router"]), dim=-1)  # [N, E]
    top = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices
    top = top[:, :cfg.top_experts]  # [N, K]
    tw = probs.gather(1, top)
    tw = tw / tw.sum(-1, keepdim=True)
    if aux is not None:
        aux.setdefault("router", []).append(probs.detach())
    out = torch.zeros_like(flat)
    gate, up, down = p[pre + "moe.gate"], p[pre + "moe.up"], p[pre + "moe.down"]
    for e in range(cfg.experts):
        tok, slot = (top == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        ye = swiglu(flat[tok], gate[e], up[e], down[e])
        # .to(out.dtype): a no-op in float32; under bf16 autocast ye is bf16
        out = out.index_add(0, tok, (ye * tw[tok, slot][:, None]).to(out.dtype))
    return out.reshape(B, L, d)


def forward(params, cfg: Config, inputs, dropout=0.0, aux=None):
    """inputs int [B, L] -> logits [B, L, V] (float32)."""
    p = params
    h = F.embedding(inputs.long(), p["tok_emb"])
    for i in range(cfg.layers):
        pre = f"layers.{i}."
        x1 = rmsnorm(h, p[pre + "attn_norm"])
        h = h + attention(x1, p, pre, cfg, cfg.layer_k[i], dropout, aux)
        x2 = rmsnorm(h, p[pre + "ffn_norm"])
        if cfg.is_moe(i):
            h = h + moe(x2, p, pre, cfg, aux)
        else:
            h = h + swiglu(x2, p[pre + "mlp.gate"], p[pre + "mlp.up"], p[pre + "mlp.down"])
    h = rmsnorm(h, p["final_norm"])
    return mm(h, p["lm_head"])


def loss_fn(logits, targets):
    """Mean cross-entropy over every target >= 0 (-1 marks padding)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).long(), ignore_index=-1)


# --------------------------------------------------------------------------- training


def make_optimizer(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    """torch.optim.AdamW (single-tensor path): p *= 1 - lr*wd; m = b1 m + (1-b1) g;
    v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""
    return torch.optim.AdamW(list(params.values()), lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, foreach=False)


def clip_grad_norm_f64(params, clip):
    """Clipping as libplasa's pl_clip_grad_norm: norm = sqrt(sum g^2) accumulated in float64,
    coef = clip / (norm + 1e-6) in float64, and only if coef < 1 every gradient times
    (float32) coef. torch 1.13's clip_grad_norm_ computes the norms in float32, which is
    off by ~1e-4 relative for the [128, 8192] LM-head gradient (see docs/benchmarks.md,
    "Training-curve parity"). Returns the norm."""
    grads = [p.grad for p in params.values()]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    coef = clip / (norm + 1e-6)
    if coef < 1.0:
        cf = torch.tensor(coef, dtype=torch.float32)
        for g in grads:
            g.mul_(cf)
    return norm


def train_step(params, opt, cfg: Config, inputs, targets, dropout=0.0, clip=1.0, clip_f64=False):
    """forward, loss, backward, clip (clip_grad_norm_: g *= min(1, clip / (norm + 1e-6));
    with clip_f64 the norm in float64 as libplasa, clip_grad_norm_f64), AdamW.
    Returns (loss, grad norm before clipping)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(forward(params, cfg, inputs, dropout), targets)
    loss.backward()
    for p in params.values():  # indexer: no gradient, but AdamW must still decay it
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if clip_f64:
        norm = clip_grad_norm_f64(params, clip)
    else:
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip).item()
    opt.step()
    return loss.item(), norm


def param_count(params):
    return sum(p.numel() for p in params.values())


# --------------------------------------------------------------------------- safetensors

_DT = {"F32": (torch.float32, 4), "I32": (torch.int32, 4)}
_DT_REV = {torch.float32: "F32", torch.int32: "I32"}


def save_safetensors(path, tensors: "OrderedDict[str, torch.Tensor]", metadata=None):
    """Writes the safetensors format: u64 LE header length N, N bytes of JSON
    {"__metadata__": {str: str}, name: {dtype, shape, data_offsets: [begin, end]}} (padded
    with spaces to a multiple of 8), then the raw little-endian data, packed in order."""
    header = OrderedDict()
    if metadata:
        header["__metadata__"] = OrderedDict((str(k), str(v)) for k, v in metadata.items())
    blobs, off = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if t.dtype not in _DT_REV:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (F32, I32 only)")
        b = t.numpy().tobytes()  # little-endian host (checked at import)
        header[name] = OrderedDict(dtype=_DT_REV[t.dtype], shape=list(t.shape),
                                   data_offsets=[off, off + len(b)])
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - (8 + len(hj)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    """Returns (OrderedDict name -> tensor (F32/I32), metadata dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: header length {n} beyond the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=OrderedDict)
    data = memoryview(raw)[8 + n:]
    meta = dict(header.pop("__metadata__", {}) or {})
    out = OrderedDict()
    for name, e in header.items():
        if e["dtype"] not in _DT:
            raise ValueError(f"{path}: tensor {name}: dtype {e['dtype']} not supported")
        dt, size = _DT[e["dtype"]]
        b, end = e["data_offsets"]
        numel = math.prod(e["shape"]) if e["shape"] else 1
        if not (0 <= b <= end <= len(data)) or end - b != numel * size:
            raise ValueError(f"{path}: tensor {name}: bad data_offsets {b, end}")
        t = torch.frombuffer(bytearray(data[b:end]), dtype=dt) if end > b else torch.empty(0, dtype=dt)
        out[name] = t.reshape(e["shape"]).clone()
    return out, meta


def load_params(path, cfg: Config):
    """Parameters of cfg from a safetensors file (extra tensors are ignored)."""
    ts, meta = load_safetensors(path)
    params = OrderedDict()
    for name, shape, _ in param_specs(cfg):
        if name not in ts:
            raise ValueError(f"{path}: no tensor {name}")
        t = ts[name]
        if list(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(f"{path}: {name} is {t.dtype} {list(t.shape)}, want F32 {shape}")
        params[name] = t.clone().requires_grad_(True)
    return params, meta


def vocab_of(path):
    """Vocabulary size implied by tok_emb in a safetensors file."""
    ts, _ = load_safetensors(path)
    return ts["tok_emb"].shape[0]
