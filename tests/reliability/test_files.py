"""Diff files: loading never runs code, malformed or maliciously sized files give a clear
ValueError/IndexError without allocating what they claim, and saves are atomic."""
import json
import os
import struct
import subprocess
import textwrap

import pytest
import torch

from conftest import child_python

import xlsparse
from xlsparse import SparseDelta, SparseDiff


def _diff():
    g = torch.Generator().manual_seed(0)
    return SparseDiff({"a.weight": SparseDelta(torch.tensor([1, 5, 17]), torch.randn(3, generator=g), (4, 5)),
                       "b.weight": SparseDelta(torch.tensor([0, 2]), torch.randn(2, generator=g), (3,))},
                      {"a.bias": torch.randn(4, generator=g)})


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_composable_sft_load_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_diff.bin"
    torch.save({"diffs": {}, "abs": {"x": _Payload(str(marker))}}, path)
    with pytest.raises(ValueError, match="cannot read a composable-sft diff file"):
        SparseDiff.load_composable_sft(str(path))
    assert not marker.exists()


def test_safetensors_load_holds_no_pickle(tmp_path):
    """A pickle renamed to .safetensors is just an unreadable file."""
    marker = tmp_path / "pwned"
    path = tmp_path / "d.safetensors"
    torch.save({"x": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SparseDiff.load(str(path))
    assert not marker.exists()


def _raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def _meta(**over):
    meta = {"format": "xlsparse.SparseDiff", "format_version": 1, "xlsparse_version": "x", "base_model": None,
            "deltas": [{"name": "w", "shape": [4, 4], "nnz": 2, "dtype": "torch.float32", "index_dtype": "torch.int32"}],
            "dense": [], "absolute": []}
    meta.update(over)
    return {"__metadata__": {"xlsparse": json.dumps(meta)}}


def _entries(nnz_claim=2, values_claim=2):
    return {"delta.0.indices": {"dtype": "I32", "shape": [nnz_claim], "data_offsets": [0, 8]},
            "delta.0.values": {"dtype": "F32", "shape": [values_claim], "data_offsets": [8, 16]}}


GOOD_DATA = struct.pack("<2i2f", 1, 6, 0.5, -0.25)


def test_hand_written_file_loads(tmp_path):
    path = str(tmp_path / "d.safetensors")
    _raw_safetensors(path, {**_meta(), **_entries()}, GOOD_DATA)
    d = SparseDiff.load(path)
    assert d.deltas["w"].indices.tolist() == [1, 6]


@pytest.mark.parametrize("name,header,data,match", [
    ("values claim 10^12 elements", {**_meta(), **_entries(values_claim=10**12)}, GOOD_DATA, "truncated or corrupt"),
    ("header length past the end", None, b"", "truncated or corrupt"),
    ("offsets past the end", {**_meta(), "delta.0.indices": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
                              "delta.0.values": {"dtype": "F32", "shape": [2], "data_offsets": [8, 4 * 10**12]}},
     GOOD_DATA, "truncated or corrupt"),
    ("wrong version", {**_meta(format_version=2), **_entries()}, GOOD_DATA, "format version 2"),
    ("not a diff", {**_meta(format="something else"), **_entries()}, GOOD_DATA, "does not describe"),
    ("metadata not json", {"__metadata__": {"xlsparse": "{nope"}, **_entries()}, GOOD_DATA, "not valid JSON"),
    ("metadata nnz lies", {**_meta(deltas=[{"name": "w", "shape": [4, 4], "nnz": 10**12, "dtype": "torch.float32",
                                            "index_dtype": "torch.int32"}]), **_entries()}, GOOD_DATA, "shape"),
    ("metadata fields missing", {**_meta(deltas=[{"name": "w"}]), **_entries()}, GOOD_DATA, "malformed metadata"),
    ("extra tensor", {**_meta(deltas=[]), **_entries()}, GOOD_DATA, "not described"),
    ("integer dense entry", {**_meta(deltas=[], dense=[{"name": "b", "shape": [2], "dtype": "torch.int32"}]),
                             "dense.0": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, GOOD_DATA[:8],
     "floating-point"),
])
def test_malformed_files_raise_value_error(tmp_path, name, header, data, match):
    path = str(tmp_path / "d.safetensors")
    if header is None:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 10**12) + b"{}")
    else:
        _raw_safetensors(path, header, data)
    with pytest.raises(ValueError, match=match):
        SparseDiff.load(path)


def test_an_edited_delta_shape_is_refused_at_load_or_at_apply(tmp_path):
    # the file's indices 1 and 6 of a [4, 4] delta. A shape that they leave is refused at load,
    # naming the file; one that still holds them is the file's word alone, refuted by the model
    path = str(tmp_path / "d.safetensors")

    def edited(shape):
        _raw_safetensors(path, {**_meta(deltas=[{"name": "w", "shape": shape, "nnz": 2, "dtype": "torch.float32",
                                                 "index_dtype": "torch.int32"}]), **_entries()}, GOOD_DATA)
        return path

    with pytest.raises(IndexError, match=f"{path}: delta 'w': indices\\[1\\] = 6 is outside \\[0, 6\\)"):
        SparseDiff.load(edited([2, 3]))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"'w' has shape \(4, 5\) but the model's tensor has \(4, 4\)"):
        SparseDiff.load(edited([4, 5])).apply(model)
    assert not model.w.any()


def test_truncated_and_bit_flipped_files_never_load_silently(tmp_path):
    """Every truncation raises; every single-byte corruption either raises ValueError/IndexError
    or loads a valid diff (a flipped value byte is still a valid float)."""
    path = str(tmp_path / "d.safetensors")
    _diff().save(path)
    data = open(path, "rb").read()
    bad = str(tmp_path / "bad.safetensors")
    for cut in sorted({0, 1, 7, 8, 9, len(data) // 2, len(data) - 1}):
        open(bad, "wb").write(data[:cut])
        with pytest.raises(ValueError):
            SparseDiff.load(bad)
    g = torch.Generator().manual_seed(0)
    for pos in torch.randint(0, len(data), (40,), generator=g).tolist():
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        open(bad, "wb").write(bytes(flipped))
        try:
            d = SparseDiff.load(bad)
        except (ValueError, IndexError):
            continue
        for delta in d.deltas.values():  # loaded: it must have passed every check
            SparseDelta(delta.indices, delta.values, delta.shape)


def test_huge_sparse_shape_loads_without_allocating(tmp_path):
    """A delta of a 10^12-element tensor with 3 entries is valid and costs 3 entries, not 10^12."""
    path = str(tmp_path / "d.safetensors")
    SparseDiff({"w": SparseDelta(torch.tensor([0, 10**11, 10**12 - 1]), torch.ones(3), (10**6, 10**6))}).save(path)
    _run_under_memory_cap(f"""
        d = SparseDiff.load({path!r})
        assert d.deltas["w"].indices.dtype == torch.int64 and d.nnz == 3
    """)


def test_composable_sft_huge_claims_are_rejected_without_allocating(tmp_path):
    path = str(tmp_path / "pytorch_diff.bin")
    good = {"size": torch.Size([10**6, 10**6]), "index_steps": [5, 10**11], "values": torch.ones(2)}
    torch.save({"diffs": {"w": good}, "abs": {}}, path)
    bad_range = str(tmp_path / "range.bin")
    torch.save({"diffs": {"w": dict(good, index_steps=[5, 10**12])}, "abs": {}}, bad_range)
    bad_count = str(tmp_path / "count.bin")
    torch.save({"diffs": {"w": dict(good, values=torch.ones(3))}, "abs": {}}, bad_count)
    _run_under_memory_cap(f"""
        d = SparseDiff.load_composable_sft({path!r})
        assert d.nnz == 2 and d.deltas["w"].shape == (10**6, 10**6)
        for p, exc in (({bad_range!r}, IndexError), ({bad_count!r}, ValueError)):
            try:
                SparseDiff.load_composable_sft(p)
            except exc as e:
                print("rejected:", e)
            else:
                raise AssertionError(p + " loaded")
    """)


def _run_under_memory_cap(body: str, cap_bytes: int = 2 * 2**30):
    """Run `body` in a fresh process whose address space may grow by at most `cap_bytes` past
    its size after imports: a loader that allocates what a file claims fails there."""
    code = textwrap.dedent("""
        import resource, torch, xlsparse
        from xlsparse import SparseDiff
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + {cap}, size + {cap}))
    """).format(cap=cap_bytes) + textwrap.dedent(body)
    res = subprocess.run(child_python("-c", code), capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]


# --- atomic saves ---

@pytest.mark.parametrize("fmt", ["safetensors", "composable-sft"])
def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fmt):
    path = tmp_path / ("d.safetensors" if fmt == "safetensors" else "pytorch_diff.bin")
    old = _diff()
    save = old.save if fmt == "safetensors" else old.save_composable_sft
    save(str(path))
    before = path.read_bytes()

    def half_written(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    if fmt == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    else:
        monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save(str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("target", ["new/sub/d.bin", "new/sub/de"])  # a file, or a folder that gets pytorch_diff.bin
def test_failed_composable_sft_save_removes_the_folders_it_made(tmp_path, monkeypatch, target):
    def disk_full(obj, path, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        _diff().save_composable_sft(str(tmp_path / target))
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_atomically_and_round_trips(tmp_path):
    path = str(tmp_path / "d.safetensors")
    _diff().save(path)
    new = _diff() * 2.0
    new.save(path)
    back = SparseDiff.load(path)
    for name, d in new.deltas.items():
        assert torch.equal(back.deltas[name].values, d.values)
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"]
    assert xlsparse.__version__
