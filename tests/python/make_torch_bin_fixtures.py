#!/usr/bin/env python3
"""Writes the PyTorch .bin fixtures of tests/unit/test_io_torch_bin.cpp into tests/data/torch_bin/.

Run it with a Python that has torch (the C++ tests need no Python; the outputs are committed):

    python tests/python/make_torch_bin_fixtures.py

Three kinds of file:
  * real torch.save outputs (the reference): dtypes, views sharing a storage, non-contiguous
    views, a module's state_dict (an OrderedDict with a BUILD), protocol 4 with a Parameter,
    CRCs switched off, a single-file and a sharded checkpoint directory. expected.json holds,
    for each tensor, the dtype, shape, contiguous bytes (hex) and sum computed by torch itself.
  * crafted archives (written by the small zip writer below, never by pickle): ZIP64 structures,
    a deflated entry, a bad CRC, missing or short records, big-endian, odd but valid opcodes.
  * malicious pickles, assembled byte by byte: GLOBAL os.system + REDUCE and friends. They are
    never unpickled here; kept must refuse them. Their payload would create MARKER, which the C++
    test checks does not exist afterwards.

Every file stays under 20 KB and the whole directory under 200 KB.
"""

import collections
import json
import os
import shutil
import struct
import sys
import zipfile
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "data", "torch_bin")
MARKER = "/tmp/kept-pwned-torch-bin"

KEPT_DTYPE = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

expected = {"files": {}, "dirs": {}, "errors": {}}


def path_of(rel):
    path = os.path.join(OUT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


# ---- expected values, computed by torch ----------------------------------------------------------
def describe(state):
    """Per tensor: dtype, shape, contiguous bytes, sum, and which tensors share a storage."""
    groups = {}
    tensors = []
    for name, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        group = groups.setdefault(ptr, len(groups))
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if t.dtype == torch.bool:
            total = float(t.sum().item())
        else:
            total = t.double().sum().item()
        tensors.append(
            {
                "name": name,
                "dtype": KEPT_DTYPE[t.dtype],
                "shape": list(t.shape),
                "hex": raw.hex(),
                "sum": total if total == total and abs(total) != float("inf") else None,
                "contiguous": t.is_contiguous(),
                "storage_group": group,
                "storage_offset": t.storage_offset(),
            }
        )
    return tensors


def save_real(rel, state, **kwargs):
    torch.save(state, path_of(rel), **kwargs)
    expected["files"][rel] = describe(state)


# ---- a minimal zip writer for crafted archives ---------------------------------------------------
def write_zip(rel, entries, zip64=False, deflate=(), bad_crc=(), align=64):
    """entries: [(name, bytes)]. Stored entries, data aligned like torch's writer ("FB" field)."""
    out = bytearray()
    central = []
    for name, data in entries:
        nb = name.encode()
        method = 8 if name in deflate else 0
        if method == 8:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = c.compress(data) + c.flush()
        else:
            payload = data
        crc = zlib.crc32(data) & 0xFFFFFFFF
        if name in bad_crc:
            crc ^= 0x5A5A5A5A
        offset = len(out)
        extra = b""
        if zip64:
            extra += struct.pack("<HHQQ", 1, 16, len(data), len(payload))
        if align:
            pad = (-(offset + 30 + len(nb) + len(extra) + 4)) % align
            extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (len(payload), len(data))
        version = 45 if zip64 else 20
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, 0x0800, method, 0, 0x21, crc, *sizes,
            len(nb), len(extra))
        out += nb + extra + payload
        central.append((nb, method, crc, len(payload), len(data), offset))
    cd_start = len(out)
    for nb, method, crc, csize, usize, offset in central:
        if zip64:
            extra = struct.pack("<HHQQQ", 1, 24, usize, csize, offset)
            fields = (0xFFFFFFFF, 0xFFFFFFFF)
            offset32 = 0xFFFFFFFF
            version = 45
        else:
            extra = b""
            fields = (csize, usize)
            offset32 = offset
            version = 20
        out += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0x0800, method, 0, 0x21, crc,
            *fields, len(nb), len(extra), 0, 0, 0, 0, offset32)
        out += nb + extra
    cd_size = len(out) - cd_start
    n = len(central)
    if zip64:
        record = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start)
        out += struct.pack("<IIQI", 0x07064B50, 0, record, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                           0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0)
    with open(path_of(rel), "wb") as f:
        f.write(bytes(out))


def torch_entries(rel):
    """The (name, bytes) entries of a torch.save archive (reading a zip runs no pickle)."""
    with zipfile.ZipFile(path_of(rel)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def archive(prefix, pickle, records, byteorder=b"little"):
    """Entries laid out like torch.save's: data.pkl, byteorder, data/<key>..., version."""
    entries = [(prefix + "/data.pkl", pickle)]
    if byteorder is not None:
        entries.append((prefix + "/byteorder", byteorder))
    entries += [(prefix + "/data/" + key, data) for key, data in records]
    entries.append((prefix + "/version", b"3\n"))
    return entries


# ---- a torch-like protocol-2 pickle writer (for crafted and malicious pickles) -------------------
def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(n):
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    length = (n.bit_length() + 8) // 8
    return b"\x8a" + bytes([length]) + n.to_bytes(length, "little", signed=True)


def p_tuple(items):
    if len(items) == 0:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + bytes([0x84 + len(items)])
    return b"(" + b"".join(items) + b"t"


def p_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_storage(key, storage_type, numel):
    pid = p_tuple([p_str("storage"), p_global("torch", storage_type), p_str(key), p_str("cpu"),
                   p_int(numel)])
    return pid + b"Q"


def p_tensor(key, storage_type, numel, offset, size, stride, metadata=None):
    args = [
        p_storage(key, storage_type, numel),
        p_int(offset),
        p_tuple([p_int(s) for s in size]),
        p_tuple([p_int(s) for s in stride]),
        b"\x89",
        p_global("collections", "OrderedDict") + b")R",
    ]
    if metadata is not None:
        args.append(metadata)
    return p_global("torch._utils", "_rebuild_tensor_v2") + p_tuple(args) + b"R"


def p_state_dict(items, ordered=True):
    head = p_global("collections", "OrderedDict") + b")R" if ordered else b"}"
    body = b"".join(p_str(k) + v for k, v in items)
    return b"\x80\x02" + head + b"(" + body + b"u."


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def crafted_expected(rel, tensors):
    """Expected values for crafted archives, checked against torch.load below."""
    expected["files"][rel] = describe(collections.OrderedDict(tensors))


def check_with_torch(rel, weights_only=True):
    """Benign crafted archives must load in torch too, with the values we expect.

    weights_only=False only for archives this script wrote itself from whitelisted globals
    (torch's restricted unpickler lacks some valid opcodes, e.g. UNICODE); never for the
    malicious ones, which are not loaded at all."""
    loaded = torch.load(path_of(rel), weights_only=weights_only)
    want = expected["files"][rel]
    got = describe(loaded)
    for w, g in zip(want, got):
        for field in ("name", "dtype", "shape", "hex"):
            assert w[field] == g[field], (rel, field, w, g)
    assert len(want) == len(got), rel


def error(rel, *needles):
    expected["errors"][rel] = list(needles)


def dump_compact(value, depth=0):
    """JSON with one line per tensor (the file stays small and diffs stay readable)."""
    if isinstance(value, dict) and not ("name" in value and "hex" in value):
        pad = "\n" + " " * (depth + 1)
        items = [json.dumps(k) + ": " + dump_compact(v, depth + 1) for k, v in sorted(value.items())]
        return "{" + pad + ("," + pad).join(items) + "\n" + " " * depth + "}" if items else "{}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        pad = "\n" + " " * (depth + 1)
        return "[" + pad + ("," + pad).join(dump_compact(v, depth + 1) for v in value) + "]"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    torch.manual_seed(1234)

    # ---- real torch.save outputs -----------------------------------------------------------------
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38])
    save_real(
        "dtypes.bin",
        {
            "f32": torch.randn(3, 4),
            "bf16": torch.randn(5).to(torch.bfloat16),
            "f16": torch.randn(2, 3).to(torch.float16),
            "f64": torch.randn(2, dtype=torch.float64),
            "i64": torch.tensor([-3, 0, 2**40, 7], dtype=torch.int64),
            "i32": torch.tensor([-(2**31), 5, 2**31 - 1], dtype=torch.int32),
            "i16": torch.tensor([-7, 300], dtype=torch.int16),
            "i8": torch.tensor([-128, 127, 1], dtype=torch.int8),
            "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
            "f32_special": special,
            "bf16_special": special.to(torch.bfloat16),
        },
    )

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 4
    hidden = torch.randn(24)  # only views of it are saved: its storage comes along whole
    cube = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    half = torch.randn(3, 5).to(torch.bfloat16)
    save_real(
        "views.bin",
        collections.OrderedDict(
            [
                ("base", base),
                ("rows", base[1:3]),  # contiguous, shares base's storage at offset 6
                ("row", base[2:3]),  # shape [1, 6]
                ("transposed", base.t()),  # non-contiguous view of the same storage
                ("column", base[:, 2]),  # stride 6
                ("tail", hidden[10:14]),  # offset 10 into a 24-element storage
                ("permuted", cube.permute(2, 0, 1)),  # rank 3, strides (1, 12, 4)
                ("strided", hidden[1::5]),  # stride 5
                ("bf16_t", half.t()),
                ("other", torch.randn(3)),
            ]
        ),
    )

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    save_real("state_dict.bin", module.state_dict())  # OrderedDict + BUILD(_metadata)
    save_real(
        "protocol4.bin",
        {"p": torch.nn.Parameter(torch.randn(2, 2)), "q": torch.randn(3)},
        pickle_protocol=4,
    )
    torch.serialization.set_crc32_options(False)
    try:
        save_real("nocrc.bin", {"a": torch.randn(4)})
    finally:
        torch.serialization.set_crc32_options(True)

    # An HF-style directory, single file and sharded (transformers' layout and names).
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.input_layernorm.bias",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    shapes = [(8, 4), (4,), (4,), (4, 4), (4,), (8, 4)]
    model = {n: torch.randn(*s).to(torch.bfloat16) for n, s in zip(names, shapes)}
    torch.save(model, path_of("single/pytorch_model.bin"))
    expected["dirs"]["single"] = {"files": ["pytorch_model.bin"], "tensors": describe(model)}
    first = {n: model[n] for n in names[:3]}
    second = {n: model[n] for n in names[3:]}
    shard1, shard2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save(first, path_of("sharded/" + shard1))
    torch.save(second, path_of("sharded/" + shard2))
    index = {
        "metadata": {"total_size": sum(t.numel() * 2 for t in model.values())},
        "weight_map": {**{n: shard1 for n in first}, **{n: shard2 for n in second}},
    }
    with open(path_of("sharded/pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    expected["dirs"]["sharded"] = {
        "files": [shard1, shard2],
        "tensors": describe(first) + describe(second),
        "file_of": {n: (shard1 if n in first else shard2) for n in names},
    }

    # Real torch outputs kept refuses, with a reason.
    torch.save({"e": torch.ones(3).expand(2, 3)}, path_of("expanded.bin"))
    error("expanded.bin", 'tensor "e"', "expanded (stride-0) view")
    torch.save({"n": torch._neg_view(torch.randn(3))}, path_of("neg_bit.bin"))
    error("neg_bit.bin", "'neg'", "conj/neg")
    torch.save({"a": torch.ones(2)}, path_of("legacy.bin"), _use_new_zipfile_serialization=False)
    error("legacy.bin", "legacy (PyTorch < 1.6, non-zip)")
    torch.save({"epoch": 3, "w": torch.ones(2)}, path_of("not_a_tensor.bin"))
    error("not_a_tensor.bin", 'tensor "epoch"', "is an int, not a tensor")
    torch.save([torch.ones(2)], path_of("not_a_dict.bin"))
    error("not_a_dict.bin", "a list, not a state dict")

    # ---- crafted archives --------------------------------------------------------------------
    views = torch_entries("views.bin")
    write_zip("zip64.bin", [(n.replace("views/", "zip64/"), d) for n, d in views], zip64=True)
    with zipfile.ZipFile(path_of("zip64.bin")) as z:
        assert z.testzip() is None  # Python's own reader accepts the ZIP64 structures
    expected["files"]["zip64.bin"] = expected["files"]["views.bin"]
    check_with_torch("zip64.bin")

    # Records at arbitrary (unaligned) offsets, as a writer without torch's padding makes them:
    # kept must copy those it cannot view with aligned typed access.
    dtype_entries = torch_entries("dtypes.bin")
    write_zip("unaligned.bin", [(n.replace("dtypes/", "unaligned/"), d) for n, d in dtype_entries],
              align=0)
    expected["files"]["unaligned.bin"] = expected["files"]["dtypes.bin"]
    check_with_torch("unaligned.bin")

    # Valid but unusual opcodes torch does not emit by default: a plain dict, UNICODE ('V'),
    # LONG1, BININT/BININT2, LONG_BINPUT/LONG_BINGET, BINFLOAT and lists inside a BUILD state,
    # an I64 storage of 300 elements, a storage used by two tensors in different pickles order.
    values = [float(i) - 1.5 for i in range(6)]
    big = list(range(300))
    odd = (
        b"\x80\x02"
        + p_global("collections", "OrderedDict") + b")R"
        + b"r\x00\x01\x00\x00"  # LONG_BINPUT 256
        + b"("
        + b"Vw\\u00e9ight\n"  # UNICODE 'w\u00e9ight'
        + p_tensor("7", "FloatStorage", 6, 0, (2, 3), (3, 1))
        + p_str("ints")
        + p_tensor("big", "LongStorage", 300, 44, (256,), (1,))
        + p_str("wt")
        + p_tensor("7", "FloatStorage", 6, 0, (3, 2), (1, 3))
        + b"u"
        + b"}" + p_str("_metadata") + b"]" + b"(" + b"G" + struct.pack(">d", 0.25)
        + b"\x8a\x08" + (-(2**62)).to_bytes(8, "little", signed=True)
        + b"J" + struct.pack("<i", -5) + b"M" + struct.pack("<H", 40000) + b"N\x88e" + b"s"
        + b"b"  # BUILD: the OrderedDict's state, ignored
        + b"j\x00\x01\x00\x00"  # LONG_BINGET 256: the same OrderedDict again
        + b"."
    )
    # STOP returns the top: the memoized OrderedDict (pushed twice: the stack is [od, od]).
    write_zip("opcodes.bin", archive("opcodes", odd, [("7", f32(values)),
                                                       ("big", struct.pack("<300q", *big))]))
    w = torch.tensor(values).reshape(2, 3)
    crafted_expected(
        "opcodes.bin",
        [("w\u00e9ight", w), ("ints", torch.tensor(big[44:300], dtype=torch.int64)), ("wt", w.t())],
    )
    check_with_torch("opcodes.bin", weights_only=False)

    dtypes = torch_entries("dtypes.bin")
    pkl = dict(dtypes)["dtypes/data.pkl"]
    others = [(n, d) for n, d in dtypes if n != "dtypes/data.pkl"]

    def variant(rel, pickle=None, drop=(), replace=None, **kwargs):
        prefix = rel[:-4]
        entries = [(prefix + "/data.pkl", pickle if pickle is not None else pkl)]
        for n, d in others:
            name = prefix + n[len("dtypes"):]
            if name in drop:
                continue
            if replace and name in replace:
                d = replace[name]
            entries.append((name, d))
        write_zip(rel, entries, **kwargs)

    variant("deflated.bin", deflate=("deflated/data.pkl",))
    error("deflated.bin", "zip entry 'deflated/data.pkl'", "compressed (method 8, deflate)")
    variant("bad_crc.bin", bad_crc=("bad_crc/data.pkl",))
    error("bad_crc.bin", "zip entry 'bad_crc/data.pkl'", "CRC-32 mismatch")
    variant("big_endian.bin", replace={"big_endian/byteorder": b"big"})
    error("big_endian.bin", "big-endian")
    variant("missing_record.bin", drop=("missing_record/data/3",))
    error("missing_record.bin", "storage record 'missing_record/data/3' is missing")
    first_record = [n for n, _ in others if n.startswith("dtypes/data/")][0]
    short = first_record.replace("dtypes", "short_record")
    variant("short_record.bin", replace={short: dict(others)[first_record][:-4]})
    error("short_record.bin", 'tensor "f32"', "holds 44 bytes, but the pickle describes 12")
    variant("truncated_pickle.bin", pickle=pkl[: len(pkl) // 2])
    error("truncated_pickle.bin", "pickle", "truncated")

    # Whole-file damage to a real torch file.
    with open(path_of("dtypes.bin"), "rb") as f:
        whole = f.read()
    with open(path_of("truncated.bin"), "wb") as f:
        f.write(whole[: len(whole) * 3 // 5])
    error("truncated.bin", "no end-of-central-directory record")
    with open(path_of("not_zip.bin"), "wb") as f:
        f.write(b"this is not a checkpoint\n")
    error("not_zip.bin", "not a torch.save archive")

    # Views the storage cannot hold.
    def one_tensor(rel, tensor_bytes, records, **kwargs):
        write_zip(rel, archive(rel[:-4], p_state_dict([("w", tensor_bytes)]), records), **kwargs)

    one_tensor("out_of_bounds.bin", p_tensor("0", "FloatStorage", 6, 2, (2, 3), (3, 1)),
               [("0", f32(values))])
    error("out_of_bounds.bin", 'tensor "w"', "reaches element 7", "holds 6 elements")
    one_tensor("unknown_storage.bin", p_tensor("0", "ComplexFloatStorage", 3, 0, (3,), (1,)),
               [("0", f32(values))])
    error("unknown_storage.bin", "storage type 'torch ComplexFloatStorage'")

    # ---- malicious pickles: refused, never run -------------------------------------------------
    command = "touch " + MARKER

    def evil(rel, pickle, *needles):
        write_zip(rel, archive(rel[:-4], pickle, []))
        error(rel, *needles)

    refuse = "which is not a tensor-rebuilding function; refusing to load"
    evil("evil_os_system.bin",
         b"\x80\x02" + p_global("os", "system") + p_tuple([p_str(command)]) + b"R.",
         "pickle asks for 'os system'", refuse, "kept never executes code from a checkpoint")
    evil("evil_posix_system.bin",
         b"\x80\x02" + p_global("posix", "system") + p_tuple([p_str(command)]) + b"R.",
         "'posix system'", refuse)
    evil("evil_builtins_eval.bin",
         b"\x80\x02" + p_global("builtins", "eval")
         + p_tuple([p_str("__import__('os').system('%s')" % command)]) + b"R.",
         "'builtins eval'", refuse)
    evil("evil_getattr.bin",
         b"\x80\x02" + p_global("__builtin__", "getattr")
         + p_tuple([p_global("collections", "OrderedDict"), p_str("fromkeys")]) + b"R.",
         "'__builtin__ getattr'", refuse)
    evil("evil_subprocess.bin",
         b"\x80\x04\x8c\x0asubprocess\x8c\x05Popen\x93"
         + p_tuple([p_tuple([p_str("touch"), p_str(MARKER)])]) + b"R.",
         "'subprocess Popen'", refuse)
    # Hidden after a valid tensor, inside the state dict.
    evil("evil_in_state_dict.bin",
         p_state_dict([("ok", p_tensor("0", "FloatStorage", 6, 0, (6,), (1,))),
                       ("bad", p_global("os", "system") + p_tuple([p_str(command)]) + b"R")]),
         "'os system'", refuse)
    # INST and OBJ call a class without GLOBAL; NEWOBJ creates an arbitrary object.
    evil("evil_inst.bin", b"\x80\x02(" + p_str(command) + b"ios\nsystem\n.", "0x69 ('i')",
         "not one kept accepts")
    evil("evil_reduce_storage.bin",
         b"\x80\x02" + p_global("torch", "FloatStorage") + b")R.", "'torch FloatStorage' cannot be called")
    evil("evil_build.bin", b"\x80\x02}" + p_str("x") + b"b.", "BUILD", "a dict")

    for name, needles in expected["errors"].items():
        assert os.path.exists(path_of(name)), name

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        f.write(dump_compact(expected) + "\n")

    total = 0
    for root, _, files in os.walk(OUT):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            assert size < 20_000, (name, size)
            total += size
    assert total < 200_000, total
    print("wrote %s: %d bytes" % (os.path.normpath(OUT), total))


if __name__ == "__main__":
    sys.exit(main())
