"""A GGUF file's header walked and checked before gguf.GGUFReader is trusted with it.

The reader takes the header at its word: an array length of 2^63 makes it loop (and grow a list)
for ever, a data offset near 2^64 wraps around in its uint64 arithmetic to a view of other bytes,
and a tensor whose type or offset was changed becomes a view of its neighbour's bytes. So every
count is checked against the bytes left before anything is built from it, and every tensor's
data range against its type, its shape and the file:

  * its type is one GGML_QUANT_SIZES knows, its row length (ne[0]) a multiple of the type's
    block, and its size exactly (elements / block) x bytes per block;
  * its offset is aligned to general.alignment (32 by default), and its bytes lie inside the
    file, after the header, overlapping no other tensor's.

Errors are ConvertErrors naming the file and the tensor or key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConvertError

DEFAULT_ALIGNMENT = 32
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 1 << 16  # tensor and key names (llama.cpp allows 64 bytes)
MAX_DEPTH = 4  # arrays of arrays of ...
STRING, ARRAY = 8, 9
# GGUFValueType -> size in bytes of a scalar: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass(frozen=True)
class TensorRange:
    name: str
    type_name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    start: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def end(self) -> int:
        return self.start + self.n_bytes


class _Cursor:
    """Reads little- or big-endian integers from `buf`, every read checked against its end."""

    def __init__(self, buf, size: int, src: Path):
        self.buf, self.size, self.src, self.pos, self.order = buf, size, src, 0, "<"

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ConvertError(
                f"truncated or malformed header: {what} needs {n} bytes at byte {self.pos}, the file has {self.size}",
                self.src,
            )

    def take(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.take("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise ConvertError(f"malformed header: {what} is {n} bytes long (at most {limit})", self.src)
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def skip_value(self, vtype: int, key: str, depth: int = 0) -> None:
        if vtype in SCALAR:
            self.need(SCALAR[vtype], f"metadata {key!r}")
            self.pos += SCALAR[vtype]
        elif vtype == STRING:
            n = self.take("Q", f"metadata {key!r}")
            self.need(n, f"metadata {key!r}")
            self.pos += n
        elif vtype == ARRAY and depth < MAX_DEPTH:
            itype = self.take("I", f"metadata {key!r}")
            count = self.take("Q", f"metadata {key!r}")
            least = SCALAR.get(itype, 8 if itype == STRING else 12)  # smallest item: a length or a header
            if count > (self.size - self.pos) // least:
                raise ConvertError(
                    f"malformed header: metadata {key!r} claims {count} items, more than the "
                    f"{self.size - self.pos} bytes left can hold",
                    self.src,
                )
            if itype in SCALAR:
                self.pos += count * SCALAR[itype]
            else:
                for _ in range(count):
                    self.skip_value(itype, key, depth + 1)
        elif vtype == ARRAY:
            raise ConvertError(f"malformed header: metadata {key!r} nests arrays deeper than {MAX_DEPTH}", self.src)
        else:
            raise ConvertError(f"malformed header: metadata {key!r} has unknown value type {vtype}", self.src)


def check_layout(buf, size: int, src: Path) -> list[TensorRange]:
    """Walk the GGUF header in `buf` (the whole file, `size` bytes); return each tensor's checked
    byte range. Raises ConvertError naming `src` and the key or tensor at fault."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    c = _Cursor(buf, size, src)
    c.need(24, "the GGUF header")
    c.pos = 4
    version = c.take("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        c.order, c.pos = ">", 4
        version = c.take("I", "the version")
    if version not in VERSIONS:
        raise ConvertError(f"GGUF version {version} is not supported (supported: 2, 3)", src)
    n_tensors = c.take("Q", "the tensor count")
    n_kv = c.take("Q", "the metadata count")
    if n_kv > (size - c.pos) // 13 or n_tensors > (size - c.pos) // 24:  # smallest entries: 13 and 24 bytes
        raise ConvertError(
            f"malformed header: {n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes", src
        )
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = c.string("a metadata key", MAX_NAME).decode("utf-8", "replace")
        vtype = c.take("I", f"the type of metadata {key!r}")
        if key == "general.alignment":
            if vtype != 4:
                raise ConvertError(f"metadata 'general.alignment' has value type {vtype}, expected uint32", src)
            alignment = c.take("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise ConvertError(f"metadata 'general.alignment' = {alignment} is not a power of two", src)
        else:
            c.skip_value(vtype, key)

    infos = []
    for _ in range(n_tensors):
        raw = c.string("a tensor name", MAX_NAME)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"malformed header: tensor name {raw[:40]!r} is not UTF-8", src) from None
        n_dims = c.take("I", f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ConvertError(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", src)
        dims = tuple(c.take("Q", f"tensor {name!r}") for _ in range(n_dims))
        type_id = c.take("I", f"tensor {name!r}")
        offset = c.take("Q", f"tensor {name!r}")
        infos.append((name, dims, type_id, offset))
    data_start = -(-c.pos // alignment) * alignment

    ranges, seen = [], set()
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise ConvertError(f"tensor {name!r} appears twice", src)
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ConvertError(f"tensor {name!r} has unknown type id {type_id}", src) from None
        shape = "x".join(map(str, dims))
        n = 1
        for d in dims:
            n *= d
        if n == 0 or n >= 1 << 62:
            raise ConvertError(f"tensor {name!r} has an impossible shape {shape}", src)
        if dims[0] % block:
            raise ConvertError(
                f"tensor {name!r} ({qtype.name}, {shape}): its row length {dims[0]} is not a "
                f"multiple of {qtype.name}'s block of {block} values",
                src,
            )
        r = TensorRange(name, qtype.name, dims, data_start + offset, n // block * block_bytes)
        if r.end > size:
            raise ConvertError(
                f"truncated or a wrong offset/type: tensor {name!r} ({qtype.name}, {shape}) needs "
                f"bytes {r.start}..{r.end} but the file has {size}",
                src,
            )
        if offset % alignment:
            raise ConvertError(
                f"tensor {name!r}: data offset {offset} is not a multiple of the alignment ({alignment} bytes)", src
            )
        ranges.append(r)
    by_start = sorted(ranges, key=lambda r: r.start)
    for a, b in zip(by_start, by_start[1:]):
        if b.start < a.end:
            raise ConvertError(
                f"tensors {a.name!r} ({a.type_name}, bytes {a.start}..{a.end}) and {b.name!r} "
                f"({b.type_name}, bytes {b.start}..{b.end}) overlap: a wrong offset or type",
                src,
            )
    return ranges
