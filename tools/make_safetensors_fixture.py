#!/usr/bin/env python3
"""Writes tests/data/fixture.safetensors, a small safetensors file made
WITHOUT libplasa, which tests/test_safetensors.c reads back.

Debian 12 packages neither the `safetensors` Python module nor a PyTorch that
can write the format (python3-torch is 1.13, which has no safetensors
support), and PyPI is out of reach here. So this script writes the file with
plain Python (struct + json) following the published format
(https://github.com/huggingface/safetensors#format):

  8 bytes: little-endian u64 N = length of the header
  N bytes: JSON object {name: {"dtype", "shape", "data_offsets": [begin, end]},
                        "__metadata__": {str: str}}
  rest:    the tensors' bytes, little endian, offsets relative to this section

It lays the file out as the reference writer (the Rust crate behind the
Python module) does, so the reference reader would accept it too: metadata
first, tensors ordered by dtype (F32 before I32) then name, their data packed
from offset 0 with no gaps in that same order, compact JSON padded with
spaces to a multiple of 8. One difference: non-ASCII metadata is written as
\\u escapes (json.dumps' default) where the reference writes raw UTF-8; both
are the same JSON, and the escapes test the reader's decoding. The file also
holds a scalar (shape []) and an empty tensor.

The values come from formulas that the C test recomputes independently:
  "w.f32"   F32 [3, 4]     w[i]   = float32((i - 5) * 0.25 + 1/3)
  "ids"     I32 [2, 3, 2]  ids[i] = i*i - 7
  "scale"   F32 []         0.5
  "empty"   F32 [0, 5]     no data
  "bias"    F32 [4]        bias[i] = -(2**-i)  (i = 0..3)
Metadata: format = "pt", step = "1234", note = "h\u00e9llo \"quoted\" \u03c0".

Usage: python3 tools/make_safetensors_fixture.py [out_path]
"""
import json
import struct
import sys


def f32_bytes(values):
    return b"".join(struct.pack("<f", v) for v in values)


def i32_bytes(values):
    return b"".join(struct.pack("<i", v) for v in values)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/fixture.safetensors"
    tensors = {
        "w.f32": ("F32", [3, 4], f32_bytes([(i - 5) * 0.25 + 1 / 3 for i in range(12)])),
        "ids": ("I32", [2, 3, 2], i32_bytes([i * i - 7 for i in range(12)])),
        "scale": ("F32", [], f32_bytes([0.5])),
        "empty": ("F32", [0, 5], b""),
        "bias": ("F32", [4], f32_bytes([-(2.0 ** -i) for i in range(4)])),
    }
    order = sorted(tensors, key=lambda n: (tensors[n][0] != "F32", n))
    data = bytearray()
    header = {"__metadata__": {"format": "pt", "step": "1234",
                               "note": "h\u00e9llo \"quoted\" \u03c0"}}
    for name in order:
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    hjson = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    hjson += b" " * ((8 - (8 + len(hjson)) % 8) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        f.write(bytes(data))
    print(f"wrote {out}: {8 + len(hjson) + len(data)} bytes, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
