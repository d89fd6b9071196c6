#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz/fuzz_safetensors.c into
tests/fuzz/corpus/: small valid files (the kinds of entries libplasa writes
and reads) and malformed ones near the edges the loader checks. The fuzzer
mutates from there. Usage: python3 tools/make_fuzz_corpus.py [out_dir]"""
import json
import os
import struct
import sys


def st(header, data=b"", pad=True, length=None):
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def f32(*v):
    return b"".join(struct.pack("<f", x) for x in v)


def t(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


seeds = {
    "empty_object": st({}),
    "one_f32": st({"w": t("F32", [2, 2], 0, 16)}, f32(1, 2, 3, 4)),
    "checkpoint": st({"__metadata__": {"step": "250", "rng.seed": "42", "rng.offset": "99"},
                      "a": t("F32", [2, 2], 0, 16), "b": t("F32", [1], 16, 20),
                      "adamw.m.a": t("F32", [2, 2], 20, 36), "ids": t("I32", [3], 36, 48)},
                     f32(*range(9)) + struct.pack("<3i", -1, 0, 7)),
    "scalar_and_empty": st({"s": t("F32", [], 0, 4), "z": t("I32", [0, 3], 4, 4)}, f32(0.5)),
    "gap_unaligned": st({"x": t("I32", [2], 1, 9)}, b"\0" * 12),
    "unicode_meta": st(b'{"__metadata__":{"k":"\\u03c0"},"\\u00e9":{"dtype":"F32","shape":[1],'
                       b'"data_offsets":[0,4]}}', f32(1)),
    "bad_dtype": st({"x": t("F64", [1], 0, 8)}, b"\0" * 8),
    "bad_overlap": st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, b"\0" * 12),
    "bad_size": st({"a": t("F32", [3], 0, 16)}, b"\0" * 16),
    "bad_past_end": st({"a": t("F32", [4], 0, 16)}, b"\0" * 8),
    "bad_json": st(b'{"a":{"dtype":"F32",', pad=False),
    "bad_length": st({}, length=1 << 40),
    "bad_dup": st(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                  b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
    "bad_meta": st(b'{"__metadata__":{"k":1}}'),
    "short": b"\x02\0\0\0",
}

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/corpus"
os.makedirs(out, exist_ok=True)
for name, b in seeds.items():
    with open(os.path.join(out, name + ".safetensors"), "wb") as f:
        f.write(b)
print(f"wrote {len(seeds)} seeds to {out}")
