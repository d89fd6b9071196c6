#!/usr/bin/python3
"""Trains the PLASA benchmark model with the PyTorch reference (plasa_ref.py), for
comparing loss curves and speed with the C trainer (plasa-train).

  train_ref.py --train train.bin [--val val.bin] [--init w.safetensors | --vocab V]
               [--steps 1000] [--seed 42] [--dropout 0.1] [--schedule progressive]
               [--windows philox|sequential|FILE] [--csv loss.csv] [--save out.safetensors]
  train_ref.py --bench [--threads 1,2] [--bench-vocab 8192,49152] [--bench-steps 10]

Token files are llm.c .bin files: 256 int32 header (magic 20240520, version 1, token
count), then the tokens as uint16. Window schedules and everything else: README.md.
"""

import argparse
import contextlib
import ctypes
import json
import math
import os
import statistics
import struct
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plasa_ref as R  # noqa: E402

BATCH_STREAM = 0x5EED0DA7A5EED0DA  # examples/plasa-train/batches.h
M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- data


def read_bin(path):
    """llm.c token file -> (1-D int32 tensor of tokens)."""
    with open(path, "rb") as f:
        head = f.read(256 * 4)
        if len(head) != 1024:
            raise ValueError(f"{path}: shorter than the 1024-byte header")
        h = struct.unpack("<256i", head)
        if h[0] != 20240520 or h[1] != 1:
            raise ValueError(f"{path}: bad magic/version {h[0]}/{h[1]} (want 20240520/1)")
        n = h[2]
        raw = f.read(2 * n)
    if len(raw) != 2 * n:
        raise ValueError(f"{path}: header says {n} tokens, file has {len(raw) // 2}")
    t = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.int32) & 0xFFFF
    return t


def philox(seed, counter):
    """Philox-4x32-10 as lib/rng.c pl_philox: key = seed (64 bits), counter = (lo, hi, 0, 0)."""
    c0, c1, c2, c3 = counter & M32, (counter >> 32) & M32, 0, 0
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        n0 = (p1 >> 32) ^ c1 ^ k0
        n2 = (p0 >> 32) ^ c3 ^ k1
        c1, c3, c0, c2 = p1 & M32, p0 & M32, n0, n2
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


class Windows:
    """Start offsets of the training windows (a window is L+1 tokens t[s .. s+L]).
    n-L valid starts: 0 .. n-L-1. Row b of step s (0-based):
      philox      start = ((w0 << 32) | w1) mod (n - L), (w0, w1, ..) =
                  philox(seed ^ 0x5eed0da7a5eed0da, s*B + b)  (= the C trainer's batches)
      sequential  start = ((s*B + b) * L) mod (n - L)
      FILE        whitespace-separated integers; entry s*B + b (lines do not matter)"""

    def __init__(self, spec, n, L, B, seed):
        self.spec, self.n, self.L, self.B, self.seed = spec, n, L, B, seed
        if n < L + 1:
            raise ValueError(f"the training file has {n} tokens, fewer than seq+1 = {L + 1}")
        self.starts = None
        if spec not in ("philox", "sequential"):
            with open(spec) as f:
                self.starts = [int(x) for x in f.read().split()]
            for i, s in enumerate(self.starts):
                if not 0 <= s <= n - L - 1:
                    raise ValueError(f"{spec}: entry {i} = {s} outside [0, {n - L - 1}]")

    def start(self, step, b):
        i = step * self.B + b
        if self.spec == "philox":
            w = philox((self.seed ^ BATCH_STREAM) & ((1 << 64) - 1), i)
            return ((w[0] << 32) | w[1]) % (self.n - self.L)
        if self.spec == "sequential":
            return (i * self.L) % (self.n - self.L)
        if i >= len(self.starts):
            raise ValueError(f"{self.spec}: needs entry {i} for step {step}, has {len(self.starts)}")
        return self.starts[i]

    def batch(self, tok, step):
        idx = torch.tensor([self.start(step, b) for b in range(self.B)])[:, None] + \
            torch.arange(self.L + 1)[None, :]
        w = tok[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def eval_windows(n, L):
    """Non-overlapping evaluation windows as the C trainer: window w has inputs
    t[wL .. wL+L) and targets t[wL+1 .. wL+L], the last one padded (target -1)."""
    w = 0
    while w * L < n - 1:
        yield w * L, min(L, n - 1 - w * L)
        w += 1


@torch.no_grad()
def evaluate(params, cfg, tok, B):
    L = cfg.seq
    loss_sum, correct, count = 0.0, 0, 0
    wins = list(eval_windows(len(tok), L))
    for i in range(0, len(wins), B):
        chunk = wins[i:i + B]
        inp = torch.zeros(len(chunk), L, dtype=torch.int32)
        tgt = torch.full((len(chunk), L), -1, dtype=torch.int32)
        for r, (s, m) in enumerate(chunk):
            inp[r, :m] = tok[s:s + m]
            tgt[r, :m] = tok[s + 1:s + 1 + m]
        logits = R.forward(params, cfg, inp)
        V = logits.shape[-1]
        lf, tf = logits.reshape(-1, V), tgt.reshape(-1).long()
        keep = tf >= 0
        loss_sum += torch.nn.functional.cross_entropy(lf[keep], tf[keep], reduction="sum").item()
        correct += int((lf[keep].argmax(-1) == tf[keep]).sum())
        count += int(keep.sum())
    return loss_sum / max(count, 1), correct / max(count, 1), count


# --------------------------------------------------------------------------- threads


def set_threads(n):
    """torch's OpenMP threads and OpenBLAS's own pthreads (torch does not set those)."""
    torch.set_num_threads(n)
    for lib in ("libopenblas.so.0", "libblas.so.3"):
        try:
            ob = ctypes.CDLL(lib)
            ob.openblas_set_num_threads(ctypes.c_int(n))
            return True
        except (OSError, AttributeError):
            continue
    return False


def blas_name():
    try:
        ob = ctypes.CDLL("libopenblas.so.0")
        ob.openblas_get_config.restype = ctypes.c_char_p
        ob.openblas_get_corename.restype = ctypes.c_char_p
        return (f"{ob.openblas_get_config().decode()} core {ob.openblas_get_corename().decode()}"
                f" threads {ob.openblas_get_num_threads()}")
    except (OSError, AttributeError):
        return "not OpenBLAS (see README: BLAS check)"


# --------------------------------------------------------------------------- modes


def bench(args):
    """Per (vocabulary, threads): 2 warm-up steps, then --bench-steps timed training steps and
    evaluation batches; the median (and min) of the per-step times. Besides the table, one
    machine-readable line per row: "result vocab=V threads=N train_ms=.. eval_ms=.." (medians;
    bench/compare_torch.sh reads these)."""
    ac = (torch.autocast("cpu", dtype=torch.bfloat16) if args.bench_autocast == "bf16"
          else contextlib.nullcontext())
    print(f"# torch {torch.__version__}, autocast {args.bench_autocast}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"# model: benchmark config, schedule {args.schedule}, batch {args.batch}, seq {args.seq}, "
          f"dropout {args.dropout}; median of {args.bench_steps} timed steps after 2 warm-up steps")
    print(f"{'vocab':>6} {'threads':>7} {'train ms/step':>14} {'(min)':>7} {'tok/s':>8} "
          f"{'eval ms/batch':>14} {'(min)':>7} {'params':>9}")
    results = []
    for V in [int(v) for v in args.bench_vocab.split(",")]:
        cfg = R.Config(vocab=V, seq=args.seq, layer_k=R.schedule_k(args.schedule, 4, args.seq))
        for nt in [int(t) for t in args.threads.split(",")]:
            set_threads(nt)
            torch.manual_seed(0)
            params = R.init_params(cfg, 0)
            opt = R.make_optimizer(params)
            g = torch.Generator().manual_seed(1)
            seq = torch.randint(0, V, (args.batch, args.seq + 1), generator=g, dtype=torch.int32)
            inp, tgt = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
            for _ in range(2):
                with ac:
                    R.train_step(params, opt, cfg, inp, tgt, args.dropout)
            tr = []
            for _ in range(args.bench_steps):
                t0 = time.perf_counter()
                with ac:
                    R.train_step(params, opt, cfg, inp, tgt, args.dropout)
                tr.append(time.perf_counter() - t0)
            ev = []
            with torch.no_grad(), ac:
                for _ in range(2):
                    R.loss_fn(R.forward(params, cfg, inp), tgt).item()
                for _ in range(args.bench_steps):
                    t0 = time.perf_counter()
                    lg = R.forward(params, cfg, inp)
                    R.loss_fn(lg, tgt).item()
                    (lg.argmax(-1) == tgt).sum().item()
                    ev.append(time.perf_counter() - t0)
            trm, evm = statistics.median(tr), statistics.median(ev)
            print(f"{V:>6} {nt:>7} {trm * 1e3:>14.1f} {min(tr) * 1e3:>7.1f} "
                  f"{args.batch * args.seq / trm:>8.0f} {evm * 1e3:>14.1f} {min(ev) * 1e3:>7.1f} "
                  f"{R.param_count(params):>9}", flush=True)
            results.append(f"result vocab={V} threads={nt} train_ms={trm * 1e3:.3f} "
                           f"eval_ms={evm * 1e3:.3f} autocast={args.bench_autocast}")
    print(f"# BLAS: {blas_name()}")
    for r in results:
        print(r)


def train(args):
    set_threads(args.threads_n)
    tok = read_bin(args.train)
    if args.init:
        V = R.vocab_of(args.init)
    elif args.vocab:
        V = args.vocab
    else:
        V = int(tok.max()) + 1
    if int(tok.max()) >= V:
        sys.exit(f"{args.train}: token id {int(tok.max())} >= vocabulary {V}")
    cfg = R.Config(vocab=V, seq=args.seq, layer_k=R.schedule_k(args.schedule, 4, args.seq))
    if args.init:
        params, _ = R.load_params(args.init, cfg)
    else:
        params = R.init_params(cfg, args.seed)
    torch.manual_seed(args.seed)  # dropout
    opt = R.make_optimizer(params, lr=args.lr, weight_decay=args.weight_decay)
    win = Windows(args.windows, len(tok), args.seq, args.batch, args.seed)
    csv = open(args.csv, "w") if args.csv else None
    if csv:
        csv.write("step,loss,grad_norm,ms\n")
    losses = []
    t_train = 0.0
    wall0 = time.perf_counter()
    for step in range(args.steps):
        inp, tgt = win.batch(tok, step)
        t0 = time.perf_counter()
        loss, norm = R.train_step(params, opt, cfg, inp, tgt, args.dropout, args.clip,
                                  args.clip_f64)
        dt = time.perf_counter() - t0
        t_train += dt
        losses.append(loss)
        if csv:
            csv.write(f"{step},{loss:.9g},{norm:.9g},{dt * 1e3:.3f}\n")
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d} loss {loss:.6f} grad_norm {norm:.4f} {dt * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
    if csv:
        csv.close()
    if args.save:
        R.save_safetensors(args.save, params, {"steps": str(args.steps),
                                               "layer_k": ",".join(map(str, cfg.layer_k))})
    res = {
        "train_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
        "tokens_per_second": args.steps * args.batch * args.seq / t_train if t_train else 0.0,
        "wall_seconds": time.perf_counter() - wall0,
        "parameters": R.param_count(params),
        "layer_k": cfg.layer_k,
        "windows": args.windows,
        "clip_norm": "float64 (libplasa)" if args.clip_f64 else "float32 (clip_grad_norm_)",
        "reference": f"tools/torch_ref/train_ref.py (torch {torch.__version__})",
    }
    if args.val:
        vt = read_bin(args.val)
        vl, acc, n = evaluate(params, cfg, vt, args.batch)
        res.update(score=1 / math.exp(vl), perplexity=math.exp(vl), accuracy=acc, val_loss=vl,
                   val_predicted_tokens=n)
    out = json.dumps(res, indent=2)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(out + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", help="llm.c .bin training tokens")
    ap.add_argument("--val", help="llm.c .bin validation tokens (evaluated after training)")
    ap.add_argument("--init", help="initial weights (safetensors, plasa_ref parameter names)")
    ap.add_argument("--vocab", type=int, help="vocabulary without --init (default: max id + 1)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=42, help="dropout, philox windows, init")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--schedule", default="progressive",
                    help="progressive|dense|uniform|dense_to_sparse|aggressive_middle or k list")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--clip-f64", action="store_true",
                    help="gradient norm of the clipping in float64, as libplasa (default: torch's "
                         "clip_grad_norm_, float32 norms)")
    ap.add_argument("--windows", default="philox", help="philox | sequential | FILE (README)")
    ap.add_argument("--csv", help="write step,loss,grad_norm,ms per step")
    ap.add_argument("--json", help="write the final JSON here too")
    ap.add_argument("--save", help="write the final weights (safetensors)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", default="1", help="threads (torch and OpenBLAS); a list for --bench")
    ap.add_argument("--bench", action="store_true", help="time training steps and eval batches")
    ap.add_argument("--bench-vocab", default="8192,49152")
    ap.add_argument("--bench-steps", type=int, default=10)
    ap.add_argument("--bench-autocast", choices=("none", "bf16"), default="none",
                    help="run --bench steps under torch.autocast('cpu', bfloat16)")
    args = ap.parse_args()
    if args.bench:
        bench(args)
        return
    if not args.train:
        ap.error("--train is required (or --bench)")
    args.threads_n = int(args.threads.split(",")[0])
    train(args)


if __name__ == "__main__":
    main()
