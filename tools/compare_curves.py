#!/usr/bin/python3
"""Training-curve parity of libplasa (plasa-train) and the PyTorch reference
(tools/torch_ref/train_ref.py): same token file, same initial weights, same windows,
dropout 0, then the two per-step training losses side by side.

  /usr/bin/python3 tools/compare_curves.py [--steps 200] [--threads 2] [--seed 42]
      [--plasa-train build/examples/plasa-train/plasa-train] [--data-dir DIR]
      [--work DIR] [--csv docs/curve_parity.csv] [--svg docs/curve_parity.svg]

1. Token files: the Brown corpus as cached by plasa-train,
   DATA_DIR/plasa-train/brown-v1-val0.1/{train,val}-8192.bin (llm.c format). If they
   are missing: `bash tools/fetch-corpus.sh` and `plasa-train --prepare-only`.
2. Initial weights: the reference's init (plasa_ref.init_params, seed --seed) written
   as one safetensors file; both trainers load it (plasa-train --init, train_ref --init).
3. plasa-train --train-bin --val-bin --vocab 8192 --init --dropout 0 --eval-every 0
   and train_ref.py --windows philox (= plasa-train's batch_random), same --seed,
   batch 2, seq 128, AdamW defaults, --threads on both.
   The reference runs twice: as is (torch's clip_grad_norm_, float32 norms) and with
   --clip-f64 (the clipping norm summed in float64, as libplasa does); --no-clip64
   skips the second run.
4. Writes the CSV (step, the losses, relative differences), an SVG (the two curves,
   and the relative differences on a log scale), prints the max relative difference and
   the final validation losses. Exit status 1 if any step of libplasa and the plain
   reference differs by more than --tolerance (default 1 %).

The loss of step s is the batch's mean cross-entropy at the start of step s (before
its update), 1-based as in plasa-train's CSV (train_ref's CSV is 0-based).
Python is used only in tools/; the build and tests never need it.

--bf16 compares libplasa with itself instead (no PyTorch needed): plasa-train twice on
the Brown corpus (its own cache; the benchmark configuration, dropout included),
same seed and init, --precision f32 and --precision bf16, both at once with
--threads each, evaluating every --eval-every steps. Writes docs/curve_bf16.csv
(step, the two training losses, their relative difference, the validation losses
where evaluated) and docs/curve_bf16.svg; exit status 1 if the final validation
losses (whole validation split) differ by more than --tolerance (default 1 %):

  /usr/bin/python3 tools/compare_curves.py --bf16 --steps 1000 --threads 1
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "torch_ref"))


def log(msg):
    print(f"compare_curves: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(cmd))
    t0 = time.time()
    r = subprocess.run(cmd, **kw)
    if r.returncode:
        sys.exit(f"compare_curves: command failed with status {r.returncode}: {' '.join(cmd)}")
    log(f"  ({time.time() - t0:.0f} s)")
    return r


def token_files(args):
    d = os.path.join(args.data_dir, "plasa-train", "brown-v1-val0.1")
    tr, va = os.path.join(d, "train-8192.bin"), os.path.join(d, "val-8192.bin")
    if not (os.path.exists(tr) and os.path.exists(va)):
        log(f"{tr} missing: fetching the corpus and preparing the token cache")
        run(["bash", os.path.join(ROOT, "tools", "fetch-corpus.sh"), args.data_dir])
        run([args.plasa_train, "--prepare-only", "--data-dir", args.data_dir],
            stdout=subprocess.DEVNULL)
    return tr, va


def read_c_csv(path):
    """plasa-train CSV: step (1-based), train_loss, ..."""
    with open(path) as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f)}


def read_torch_csv(path):
    """train_ref CSV: step (0-based), loss, grad_norm, ms -> 1-based."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return ({int(r["step"]) + 1: float(r["loss"]) for r in rows},
            {int(r["step"]) + 1: float(r["grad_norm"]) for r in rows})


# --------------------------------------------------------------------------- SVG


def nice_step(rng, want):
    """1, 2 or 5 times a power of ten giving about `want` ticks (as report.c)."""
    if not rng > 0:
        return 1.0
    raw = rng / want
    p = 10 ** math.floor(math.log10(raw))
    f = raw / p
    return (1 if f < 1.5 else 2 if f < 3.5 else 5 if f < 7.5 else 10) * p


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(path, steps, c, t, rel, rel64, title, subtitle, tol,
              names=("PyTorch reference (train_ref.py)", "libplasa (plasa-train)"),
              diff_label="|libplasa - torch| / torch",
              diff_name="vs PyTorch reference (clip_grad_norm_, float32 norms)", dots=None):
    W, H = 900, 790
    ml, mr = 90, 30
    top = (75, 400)  # y range of the loss panel
    bot = (505, 725)  # y range of the difference panel
    pw = W - ml - mr
    xmin, xmax = 0, max(steps)
    xs = nice_step(xmax - xmin, 8)
    xmax = math.ceil(xmax / xs) * xs

    def px(x):
        return ml + (x - xmin) / (xmax - xmin) * pw

    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{W / 2:.1f}" y="30" font-size="19" text-anchor="middle">{esc(title)}</text>',
           f'<text x="{W / 2:.1f}" y="54" font-size="14" text-anchor="middle" fill="#444">'
           f'{esc(subtitle)}</text>']

    def frame(y0, y1, ylo, yhi, yticks, ylabel, fmt):
        def py(y):
            return y0 + (yhi - y) / (yhi - ylo) * (y1 - y0)
        for y in yticks:
            out.append(f'<line x1="{ml}" y1="{py(y):.1f}" x2="{ml + pw}" y2="{py(y):.1f}" stroke="#e0e0e0"/>')
            out.append(f'<text x="{ml - 8}" y="{py(y) + 4:.1f}" font-size="13" text-anchor="end">{fmt(y)}</text>')
        x = xmin
        while x <= xmax + xs * 1e-6:
            out.append(f'<line x1="{px(x):.1f}" y1="{y0}" x2="{px(x):.1f}" y2="{y1}" stroke="#e0e0e0"/>')
            out.append(f'<text x="{px(x):.1f}" y="{y1 + 20}" font-size="13" text-anchor="middle">{x:g}</text>')
            x += xs
        out.append(f'<rect x="{ml}" y="{y0}" width="{pw}" height="{y1 - y0}" fill="none" stroke="black"/>')
        out.append(f'<text transform="translate(24 {(y0 + y1) / 2:.1f}) rotate(-90)" font-size="14" '
                   f'text-anchor="middle">{esc(ylabel)}</text>')
        return py

    # panel 1: the two loss curves
    lo, hi = min(min(c), min(t)), max(max(c), max(t))
    ys = nice_step(hi - lo, 6)
    lo, hi = math.floor(lo / ys) * ys, math.ceil(hi / ys) * ys
    ticks = [lo + i * ys for i in range(int(round((hi - lo) / ys)) + 1)]
    py = frame(top[0], top[1], lo, hi, ticks, "training loss (nats/token)", lambda v: f"{v:g}")
    for vals, color, width, dash in ((t, "#e6550d", 4, ""), (c, "#08519c", 1.5, "")):
        pts = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in zip(steps, vals))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="{width}" {dash}points="{pts}"/>')
    lx, ly = ml + pw - 330, top[0] + 12
    out.append(f'<rect x="{lx}" y="{ly}" width="320" height="56" fill="white" fill-opacity="0.9" stroke="#999"/>')
    if dots:  # validation points: (steps, values of t, values of c)
        for vals, color in ((dots[1], "#e6550d"), (dots[2], "#08519c")):
            for s_, v in zip(dots[0], vals):
                out.append(f'<circle cx="{px(s_):.1f}" cy="{py(v):.1f}" r="4" fill="{color}" '
                           'stroke="black" stroke-width="0.8"/>')
    for i, (name, color, width) in enumerate(((names[0], "#e6550d", 4),
                                             (names[1], "#08519c", 1.5))):
        y = ly + 20 + 22 * i
        out.append(f'<line x1="{lx + 10}" y1="{y - 4}" x2="{lx + 40}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="{width}"/><text x="{lx + 48}" y="{y}" font-size="13">{esc(name)}</text>')

    # panel 2: |relative difference|, log scale
    floor_v = 1e-8
    lv = [math.log10(max(r, floor_v)) for r in rel]
    lv64 = [math.log10(max(r, floor_v)) for r in rel64] if rel64 else []
    lo2 = math.floor(min(lv + lv64 + [-7]))
    hi2 = math.ceil(max(max(lv), math.log10(tol) + 0.5))
    py2 = frame(bot[0], bot[1], lo2, hi2, list(range(lo2, hi2 + 1)),
                diff_label, lambda v: f"1e{v:d}")
    out.append(f'<line x1="{ml}" y1="{py2(math.log10(tol)):.1f}" x2="{ml + pw}" '
               f'y2="{py2(math.log10(tol)):.1f}" stroke="#d62728" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{ml + pw - 6}" y="{py2(math.log10(tol)) - 6:.1f}" font-size="12" '
               f'text-anchor="end" fill="#d62728">tolerance {tol:g}</text>')
    series = [(lv, "#333", diff_name)]
    if lv64:
        series.append((lv64, "#31a354", "vs PyTorch reference --clip-f64 (norm in float64)"))
    for i, (vals, color, name) in enumerate(series):
        pts = " ".join(f"{px(s):.1f},{py2(v):.1f}" for s, v in zip(steps, vals))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{pts}"/>')
        y = 448 + 18 * i
        out.append(f'<line x1="{ml + 10}" y1="{y - 4}" x2="{ml + 40}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{ml + 48}" y="{y}" font-size="12">libplasa {esc(name)}'
                   '</text>')
    if floor_v and lo2 <= math.log10(floor_v):
        out.append(f'<text x="{ml + pw}" y="{H - 22}" font-size="11" text-anchor="end" '
                   f'fill="#666">values below {floor_v:g} drawn at {floor_v:g} (the CSVs have 6 '
                   'decimals)</text>')
    out.append(f'<text x="{ml + pw / 2:.1f}" y="{H - 22}" font-size="15" text-anchor="middle">step</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# --------------------------------------------------------------------------- main


def read_c_rows(path):
    """plasa-train CSV rows: {step: (train_loss, val_loss or None)}."""
    with open(path) as f:
        return {int(r["step"]): (float(r["train_loss"]),
                                 float(r["val_loss"]) if r["val_loss"] else None)
                for r in csv.DictReader(f)}


def bf16_main(args):
    """plasa-train --precision f32 vs bf16: same seed, init and batches."""
    work = args.work or tempfile.mkdtemp(prefix="compare_curves.")
    os.makedirs(work, exist_ok=True)
    csv_out = args.csv if args.csv_given else os.path.join(ROOT, "docs", "curve_bf16.csv")
    svg_out = args.svg if args.svg_given else os.path.join(ROOT, "docs", "curve_bf16.svg")
    runs = {}
    for p in ("f32", "bf16"):
        runs[p] = (os.path.join(work, f"{p}.csv"), os.path.join(work, f"{p}.json"))
    if not args.reuse:
        # the corpus cache first, so the two runs do not both build it
        run([args.plasa_train, "--prepare-only", "--data-dir", args.data_dir],
            stdout=subprocess.DEVNULL)
        procs = []
        for p in ("f32", "bf16"):
            cmd = [args.plasa_train, "--data-dir", args.data_dir, "--steps", str(args.steps),
                   "--seed", str(args.seed), "--threads", str(args.threads),
                   "--eval-every", str(args.eval_every), "--precision", p,
                   "--csv", runs[p][0], "--json", runs[p][1]]
            log("$ " + " ".join(cmd))
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        t0 = time.time()
        for cmd, pr in procs:
            if pr.wait():
                sys.exit(f"compare_curves: command failed with status {pr.returncode}: "
                         f"{' '.join(cmd)}")
        log(f"  (both runs: {time.time() - t0:.0f} s)")
    a, b = read_c_rows(runs["f32"][0]), read_c_rows(runs["bf16"][0])
    steps = sorted(set(a) & set(b))
    if len(steps) != args.steps:
        sys.exit(f"compare_curves: {len(steps)} common steps, expected {args.steps}")
    fl, bl = [a[s][0] for s in steps], [b[s][0] for s in steps]
    rel = [abs(x - y) / abs(x) for x, y in zip(fl, bl)]
    with open(csv_out, "w") as f:
        f.write("step,f32_train_loss,bf16_train_loss,rel_diff,f32_val_loss,bf16_val_loss\n")
        for i, s in enumerate(steps):
            fv, bv = a[s][1], b[s][1]
            f.write(f"{s},{fl[i]:.6f},{bl[i]:.6f},{rel[i]:.3e},"
                    f"{'' if fv is None else f'{fv:.6f}'},{'' if bv is None else f'{bv:.6f}'}\n")
    with open(runs["f32"][1]) as f:
        fj = json.load(f)
    with open(runs["bf16"][1]) as f:
        bj = json.load(f)
    vs = [s for s in steps if a[s][1] is not None and b[s][1] is not None]
    vrel = abs(bj["val_loss"] - fj["val_loss"]) / fj["val_loss"]
    title = "libplasa: bf16 products vs f32, training loss (dots: validation loss)"
    subtitle = (f"plasa-train, Brown, V {fj.get('config', {}).get('vocab', '?')}, "
                f"seed {args.seed}, {args.threads} thread(s): final val {fj['val_loss']:.4f} f32, "
                f"{bj['val_loss']:.4f} bf16 ({vrel:.1e})")
    write_svg(svg_out, steps, bl, fl, rel, [], title, subtitle, args.tolerance,
              names=("f32 (--precision f32)", "bf16 (--precision bf16)"),
              diff_label="|bf16 - f32| / f32", diff_name="training loss, bf16 vs f32",
              dots=(vs, [a[s][1] for s in vs], [b[s][1] for s in vs]))
    imax = max(range(len(rel)), key=lambda i: rel[i])
    print(f"runs: {runs['f32'][0]}, {runs['bf16'][0]}")
    print(f"training loss: max relative difference {rel[imax]:.3e} at step {steps[imax]}, "
          f"mean {sum(rel) / len(rel):.3e}; step {steps[-1]}: f32 {fl[-1]:.6f}, bf16 {bl[-1]:.6f}")
    print(f"final validation loss (whole split): f32 {fj['val_loss']:.6f}, bf16 "
          f"{bj['val_loss']:.6f} (rel {vrel:.2e}); accuracy {fj['accuracy']:.6f} vs "
          f"{bj['accuracy']:.6f}")
    print(f"training tokens/s: f32 {fj['tokens_per_second']:.0f}, bf16 "
          f"{bj['tokens_per_second']:.0f} (two runs at once, {args.threads} thread(s) each; "
          "indicative)")
    print(f"wrote {csv_out} and {svg_out}; run files in {work}")
    ok = vrel <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: final validation loss within {args.tolerance:g}")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42, help="init (reference), windows")
    ap.add_argument("--plasa-train", default=os.path.join(ROOT, "build", "examples", "plasa-train",
                                                          "plasa-train"))
    ap.add_argument("--data-dir", default=os.environ.get("PLASA_DATA") or
                    os.path.join(os.path.expanduser("~"), ".cache", "plasa"))
    ap.add_argument("--init", help="initial weights (default: the reference init, written to --work)")
    ap.add_argument("--work", help="directory for the runs' files (default: a temporary one)")
    ap.add_argument("--csv", default=os.path.join(ROOT, "docs", "curve_parity.csv"))
    ap.add_argument("--svg", default=os.path.join(ROOT, "docs", "curve_parity.svg"))
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--no-clip64", action="store_true", help="skip the --clip-f64 reference run")
    ap.add_argument("--reuse", action="store_true",
                    help="take the runs' CSV/JSON files from --work instead of training again")
    ap.add_argument("--bf16", action="store_true",
                    help="plasa-train --precision f32 vs bf16 instead (no PyTorch needed)")
    ap.add_argument("--eval-every", type=int, default=100, help="with --bf16")
    args = ap.parse_args()
    args.csv_given = "--csv" in " ".join(sys.argv)
    args.svg_given = "--svg" in " ".join(sys.argv)
    if not os.access(args.plasa_train, os.X_OK):
        sys.exit(f"compare_curves: {args.plasa_train} not found: build it first "
                 "(cmake -S . -B build && cmake --build build -j2 --target plasa-train)")
    if args.reuse and not args.work:
        ap.error("--reuse needs --work DIR")
    if args.bf16:
        return bf16_main(args)
    import plasa_ref as R  # noqa: E402  (needs torch: imported after the cheap checks)

    # torch's OpenMP threads spin-wait against OpenBLAS's pthreads otherwise (10x slower
    # steps with 2 threads here; bench/compare_torch.sh --omp-wait); no effect on results
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = args.work or tempfile.mkdtemp(prefix="compare_curves.")
    os.makedirs(work, exist_ok=True)
    train_bin, val_bin = token_files(args)
    V = 8192
    if args.reuse and not args.work:
        ap.error("--reuse needs --work DIR")
    init = args.init
    if args.reuse:
        pass
    elif not init:
        init = os.path.join(work, "init.safetensors")
        cfg = R.Config(vocab=V)
        R.save_safetensors(init, R.init_params(cfg, args.seed),
                           {"generator": "plasa_ref.init_params", "seed": str(args.seed)})
        log(f"initial weights: {init} (plasa_ref.init_params, seed {args.seed})")
    common = ["--steps", str(args.steps), "--seed", str(args.seed), "--threads", str(args.threads),
              "--dropout", "0"]
    c_csv, c_json = os.path.join(work, "plasa.csv"), os.path.join(work, "plasa.json")
    t_csv, t_json = os.path.join(work, "torch.csv"), os.path.join(work, "torch.json")
    if not args.reuse:
        run([args.plasa_train, "--train-bin", train_bin, "--val-bin", val_bin, "--vocab", str(V),
             "--init", init, "--eval-every", "0", "--csv", c_csv, "--json", c_json] + common,
            stdout=subprocess.DEVNULL)
    ref = [sys.executable, os.path.join(HERE, "torch_ref", "train_ref.py"), "--train", train_bin,
           "--val", val_bin, "--init", init, "--windows", "philox", "--log-every", "50"] + common
    t64_csv, t64_json = os.path.join(work, "torch_clip64.csv"), os.path.join(work, "torch_clip64.json")
    if not args.reuse:
        run(ref + ["--csv", t_csv, "--json", t_json], stdout=subprocess.DEVNULL)
    if args.reuse and not os.path.exists(t64_csv):
        args.no_clip64 = True
    if not args.no_clip64 and not args.reuse:
        run(ref + ["--clip-f64", "--csv", t64_csv, "--json", t64_json], stdout=subprocess.DEVNULL)

    c = read_c_csv(c_csv)
    t, tnorm = read_torch_csv(t_csv)
    steps = sorted(set(c) & set(t))
    if len(steps) != args.steps:
        sys.exit(f"compare_curves: {len(steps)} common steps, expected {args.steps}")
    cl, tl = [c[s] for s in steps], [t[s] for s in steps]
    rel = [abs(a - b) / abs(b) for a, b in zip(cl, tl)]
    t64, rel64, tj64 = {}, [], None
    if not args.no_clip64:
        t64, _ = read_torch_csv(t64_csv)
        rel64 = [abs(c[s] - t64[s]) / abs(t64[s]) for s in steps]
        with open(t64_json) as f:
            tj64 = json.load(f)
    with open(args.csv, "w") as f:
        f.write("step,libplasa_loss,torch_loss,rel_diff,torch_grad_norm"
                + (",torch_clip64_loss,rel_diff_clip64" if t64 else "") + "\n")
        for i, s in enumerate(steps):
            f.write(f"{s},{cl[i]:.6f},{tl[i]:.6f},{rel[i]:.3e},{tnorm[s]:.6f}"
                    + (f",{t64[s]:.6f},{rel64[i]:.3e}" if t64 else "") + "\n")
    with open(c_json) as f:
        cj = json.load(f)
    with open(t_json) as f:
        tj = json.load(f)
    imax = max(range(len(rel)), key=lambda i: rel[i])
    title = "libplasa (plasa-train) vs PyTorch reference (train_ref.py): training loss"
    subtitle = (f"Brown, V 8192, same init and windows, dropout 0, {args.threads} threads: "
                f"max rel. diff {rel[imax]:.1e}"
                + (f" ({max(rel64):.1e} with --clip-f64)" if rel64 else ""))
    write_svg(args.svg, steps, cl, tl, rel, rel64, title, subtitle, args.tolerance)

    def first_above(x):
        return next((s for s, r in zip(steps, rel) if r > x), None)

    print(f"libplasa run: {c_csv}; reference: {t_csv}" + ("" if args.no_clip64 else f", {t64_csv}"))
    print(f"steps compared: {len(steps)} (1..{steps[-1]})")
    print(f"max relative difference: {rel[imax]:.3e} at step {steps[imax]} "
          f"(libplasa {cl[imax]:.6f}, torch {tl[imax]:.6f})")
    print(f"mean relative difference: {sum(rel) / len(rel):.3e}; first step above 1e-5: "
          f"{first_above(1e-5)}, above 1e-4: {first_above(1e-4)}, above 1e-3: {first_above(1e-3)}")
    print(f"step 1 loss: libplasa {cl[0]:.6f}, torch {tl[0]:.6f}; step {steps[-1]}: "
          f"libplasa {cl[-1]:.6f}, torch {tl[-1]:.6f}")
    print(f"final validation loss: libplasa {cj['val_loss']:.6f}, torch {tj['val_loss']:.6f} "
          f"(rel {abs(cj['val_loss'] - tj['val_loss']) / tj['val_loss']:.2e}); accuracy "
          f"{cj['accuracy']:.6f} vs {tj['accuracy']:.6f}")
    if t64:
        j = max(range(len(rel64)), key=lambda i: rel64[i])
        print(f"reference with --clip-f64 (clipping norm in float64, as libplasa): max relative "
              f"difference {rel64[j]:.3e} at step {steps[j]}; final validation loss "
              f"{tj64['val_loss']:.6f} (rel {abs(cj['val_loss'] - tj64['val_loss']) / tj64['val_loss']:.2e})")
    print(f"training tokens/s: libplasa {cj['tokens_per_second']:.0f}, torch "
          f"{tj['tokens_per_second']:.0f} (threads {args.threads}; shared machine: indicative)")
    print(f"wrote {args.csv} and {args.svg}; run files in {work}")
    ok = rel[imax] <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: every step within {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
