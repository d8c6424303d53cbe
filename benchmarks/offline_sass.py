"""Registers, spills and SASS of our Pallas kernels as the device's own compiler builds them, on a
machine without a GPU.

jaxlib's XLA compiles Pallas-Triton kernels with its own Triton; a separately installed Triton does
not give the same code (the v5 scan kernels were predicted from Triton 3.6's SASS and ran 3-4x
slower than that on the H200, where Nsight Compute showed another layout:
NOTES_selective_scan.md).
This script compiles one op call with XLA's GPU compiler for a described H100 or H200
(`ssm_lab.ops.pallas.lowering.compile_deviceless`), takes the cubins out of the serialized
executable, and reports per kernel: registers, stack (spills), shared memory, static SASS
instructions and the opcode mix (SHFL, BAR, MUFU, HGMMA, ...), with each kernel's .sass next to it.

Checked against Nsight Compute on the H200 (2026-12-04; the profiles are in git history, tag kernel-lab-history):
registers identical for every kernel ncu profiled (the scan's four v4 kernels and the v5 forward and
backward at (8, 2048, 1536, 16); the SSD's three kernels at (8, 2048, 24, 64, 128)), and static
instruction counts identical where ncu's source page exists (v4 backward 5392, v5 forward 5208,...).

Setup, once (git-ignored `.tools/`; the wheels are the device image's jaxlib 0.11.2 plugin and
NVIDIA's disassemblers):

    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \\
      -d .tools/wheels jax-cuda12-plugin==0.11.2 jax-cuda12-pjrt==0.11.2 \\
      nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
    .venv/bin/python -m pip install -q --no-deps --target .tools/site .tools/wheels/jax_cuda12_*.whl
    for w in .tools/wheels/nvidia_*.whl; do python3 -m zipfile -e "$w" .tools/cuda; done
    chmod +x .tools/cuda/nvidia/*/bin/*

Run (the op and its arguments are benchmarks/profile_kernels.py's):

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=.tools/site .venv/bin/python \\
      benchmarks/offline_sass.py --op scan --shape 8x2048x1536x16 --config '{"fwd": "v5"}' \\
      --out /tmp/sass

Without the plugin, `--cubins DIR` still reads cubins saved earlier.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import pickletools
import re
import shutil
import struct
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ cubins out of XLA

def _varint(data: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if i >= len(data) or shift > 35:
      raise ValueError("varint runs off the data")
    b = data[i]
    i += 1
    value |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return value, i


def snappy_block(data: bytes, i: int, limit: int) -> tuple[bytes, int]:
  """Decode a raw Snappy block body from data[i:] (after its length varint) until `limit` bytes
  are out, the data ends, or a back-reference is invalid. Returns (output, index reached)."""
  out = bytearray()
  while i < len(data) and len(out) < limit:
    tag = data[i]
    start = i
    i += 1
    kind = tag & 3
    if kind == 0:                                        # literal
      n = tag >> 2
      if n >= 60:
        width = n - 59
        n = int.from_bytes(data[i:i + width], "little")
        i += width
      n += 1
      out += data[i:i + n]
      i += n
      continue
    if i >= len(data):
      return bytes(out), start
    if kind == 1:
      n, off = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | data[i]
      i += 1
    elif kind == 2:
      n, off = (tag >> 2) + 1, int.from_bytes(data[i:i + 2], "little")
      i += 2
    else:
      n, off = (tag >> 2) + 1, int.from_bytes(data[i:i + 4], "little")
      i += 4
    if off == 0 or off > len(out):
      return bytes(out), start
    for _ in range(n):
      out.append(out[-off])
  return bytes(out), i


RIEGELI_BLOCK = 1 << 16          # a Riegeli file puts a 24-byte block header every 64 KiB
RIEGELI_BLOCK_HEADER = 24
# The first block header of every Riegeli file (previous chunk 0, next chunk 64) has this hash: it
# marks where a file starts, which fixes where its block headers fall.
RIEGELI_FILE_START = bytes.fromhex("83af70d10d884a3f0000000000000000")


def _unblock(data: bytes, file_start: int) -> bytes:
  """data with the Riegeli block headers of a file starting at file_start cut out."""
  out = bytearray(data[:file_start + RIEGELI_BLOCK])
  k = 1
  while file_start + k * RIEGELI_BLOCK < len(data):
    a = file_start + k * RIEGELI_BLOCK + RIEGELI_BLOCK_HEADER
    out += data[a:file_start + (k + 1) * RIEGELI_BLOCK]
    k += 1
  return bytes(out)


def riegeli_snappy(data: bytes, marker: bytes, starts) -> bytes:
  """The Snappy-compressed Riegeli chunk whose output begins with `marker`.

  XLA serialises a GPU executable as Riegeli records with Snappy compression, nested twice (the
  PJRT executable, then the GPU executable proto holding the kernels' ELF images). A chunk's Snappy
  stream is [varint length][block] and its first literal holds `marker`; the file's 64 KiB block
  headers cut through the block and are removed relative to the file's start (the candidates in
  `starts`, tried in turn until the block decodes to exactly its length)."""
  m = data.find(marker)
  if m < 0:
    raise RuntimeError(f"{marker[:40]!r} not found")
  for tag in range(m - 1, max(m - 6, -1), -1):          # the literal's tag (and length bytes)
    if data[tag] & 3:
      continue
    for pre in range(max(tag - 5, 0), tag):
      try:
        n, body = _varint(data, pre)
      except ValueError:
        continue
      if body != tag or n < len(marker):
        continue
      for fs in starts:
        if 0 <= fs < tag:
          out, _ = snappy_block(_unblock(data, fs), tag, n)
          if len(out) == n and out.startswith(marker):
            return out
  raise RuntimeError(f"no Snappy chunk decodes to its length before {marker[:40]!r}")


def _file_starts(data: bytes) -> list[int]:
  return [m.start() for m in re.finditer(re.escape(RIEGELI_FILE_START), data)]


def cubins_of(compiled) -> dict[str, bytes]:
  """{kernel name: cubin} of a compiled GPU executable (each kernel's own ELF, named after its
  `.text.<name>` section)."""
  from jax.experimental import serialize_executable  # noqa: PLC0415
  blob, _, _ = serialize_executable.serialize(compiled)
  # The pickle holds the PJRT executable as one bytes object, the largest in it: a varint-prefixed
  # header, then a Riegeli file.
  raw = max((arg for op, arg, _ in pickletools.genops(blob) if isinstance(arg, bytes)), key=len)
  outer = riegeli_snappy(raw, b"\n\x1dxla.ExecutableAndOptionsProto", _file_starts(raw))
  inner = riegeli_snappy(outer, b"\n\x1axla.gpu.GpuExecutableProto", _file_starts(outer))
  cubins = {}
  for m in re.finditer(rb"\x7fELF\x02\x01\x01", inner):
    s = m.start()
    head = inner[s:s + 64]
    if len(head) < 64 or struct.unpack("<H", head[18:20])[0] != 190:       # EM_CUDA
      continue
    phoff, shoff = struct.unpack("<QQ", head[0x20:0x30])
    phentsize, phnum, shentsize, shnum = struct.unpack("<HHHH", head[0x36:0x3E])
    elf = inner[s:s + max(shoff + shentsize * shnum, phoff + phentsize * phnum)]
    names = re.findall(rb"\.text\.([A-Za-z0-9_$.]+)\x00", elf)
    name = names[0].decode() if names else f"elf_{s}"
    if len(elf) > len(cubins.get(name, b"")):
      cubins[name] = elf
  return cubins


# ------------------------------------------------------------------------------ reading the SASS

def _tool(name: str, cuda_bin: str | None) -> str:
  cands = ([os.path.join(cuda_bin, name)] if cuda_bin else []) + sorted(
      glob.glob(os.path.join(ROOT, ".tools", "cuda", "nvidia", "*", "bin", name)))
  for c in cands:
    if os.access(c, os.X_OK):
      return c
  found = shutil.which(name)
  if found:
    return found
  raise SystemExit(f"{name} not found: pass --cuda_bin (the nvidia-cuda-{name} wheel's bin folder)")


def analyse(path: pathlib.Path, cuda_bin: str | None) -> dict:
  """Resource usage and opcode mix of one cubin; writes <cubin>.sass."""
  usage = subprocess.run([_tool("cuobjdump", cuda_bin), "-res-usage", str(path)],
                         capture_output=True, text=True, check=False).stdout
  sass = subprocess.run([_tool("nvdisasm", cuda_bin), "-c", str(path)],
                        capture_output=True, text=True, check=False)
  if sass.returncode != 0:
    raise RuntimeError(f"{path}: nvdisasm failed: {sass.stderr.strip()[:300]}")
  path.with_suffix(".sass").write_text(sass.stdout)
  return dict(resource_usage(usage), **opcode_mix(sass.stdout))


def resource_usage(text: str) -> dict:
  """Registers, stack, shared and local bytes from `cuobjdump -res-usage` (first function)."""
  m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
  if not m:
    return {}
  keys = ("registers", "stack_bytes", "shared_bytes", "local_bytes")
  return dict(zip(keys, map(int, m.groups()), strict=True))


def opcode_mix(sass: str) -> dict:
  """Static instruction count and opcodes (predicates and modifiers dropped) of `nvdisasm -c`."""
  ops = collections.Counter()
  for line in sass.splitlines():
    m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    if m:
      ops[m.group(1)] += 1
  return {"instructions": sum(ops.values()), "opcodes": dict(ops.most_common())}


# ------------------------------------------------------------------------------------------- main

def compile_op(op: str, shape: tuple[int, ...], mode: str, config: dict, gpu: str):
  from benchmarks import profile_kernels as PK  # noqa: PLC0415
  from ssm_lab.ops.pallas import lowering  # noqa: PLC0415
  from ssm_lab.ops.pallas.selective_scan import wrapper as PSS  # noqa: PLC0415
  from ssm_lab.ops.pallas import ssd as PAL  # noqa: PLC0415
  # On this CPU machine the ops would pick interpret mode: build the GPU kernels instead.
  PSS.interpret_mode = PAL.interpret_mode = lambda: False
  fn, structs = PK.build(op, shape, mode, config, abstract=True)
  return lowering.compile_deviceless(fn, *structs, gpu=gpu)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--op", default="scan", help="scan | ssd (profile_kernels.py's ops)")
  ap.add_argument("--shape", default="8x2048x1536x16")
  ap.add_argument("--mode", default="fwdbwd", choices=("fwd", "fwdbwd"))
  ap.add_argument("--config", default="{}", help="JSON: Config fields / ssd_pallas kwargs")
  ap.add_argument("--gpu", default="H100", choices=("H100", "H200"))
  ap.add_argument("--kernels", default="selective_scan|ssd_",
                  help="regex of kernel names to report")
  ap.add_argument("--out", required=True)
  ap.add_argument("--cuda_bin", default=None, help="folder with cuobjdump and nvdisasm")
  ap.add_argument("--cubins", default=None, help="analyse the .cubin files in this folder instead")
  opts = ap.parse_args()
  out = pathlib.Path(opts.out)
  out.mkdir(parents=True, exist_ok=True)
  if opts.cubins:
    paths = sorted(pathlib.Path(opts.cubins).glob("*.cubin"))
    meta = dict(source=opts.cubins)
  else:
    from benchmarks import profile_kernels  # noqa: PLC0415
    shape, config = profile_kernels.parse_call(opts.op, opts.shape, opts.config)
    compiled = compile_op(opts.op, shape, opts.mode, config, opts.gpu)
    cubins = cubins_of(compiled)
    paths = []
    for name, elf in cubins.items():
      p = out / f"{name}.cubin"
      p.write_bytes(elf)
      paths.append(p)
    meta = dict(op=opts.op, shape=list(shape), mode=opts.mode, config=config, gpu=opts.gpu)
  rows = {}
  for p in paths:
    if re.search(opts.kernels, p.stem):
      rows[p.stem] = analyse(p, opts.cuda_bin)
  (out / "sass.json").write_text(json.dumps(dict(meta=meta, kernels=rows), indent=1))
  lines = [f"offline SASS ({json.dumps(meta)})", "",
           "| kernel | registers | stack B | shared B | instructions | SHFL | BAR | MUFU | LDL+STL "
           "| top opcodes |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for name, r in rows.items():
    o = r["opcodes"]
    top = ", ".join(f"{k} {v}" for k, v in list(o.items())[:6])
    lines.append(f"| {name} | {r.get('registers', '?')} | {r.get('stack_bytes', '?')} | "
                 f"{r.get('shared_bytes', '?')} | {r['instructions']} | {o.get('SHFL', 0)} | "
                 f"{o.get('BAR', 0)} | {o.get('MUFU', 0)} | {o.get('LDL', 0) + o.get('STL', 0)} | "
                 f"{top} |")
  (out / "sass.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
