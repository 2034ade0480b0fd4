"""Whole-block reads through shardio (blockread.py): the same values as zarr-python for every
selection it takes, damage reported (never handed to zarr), and its fallback to zarr logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import zarr

import crucible_record as cr
from crucible_record import blockread
from crucible_record.reader import normalize_key
from crucible_record.storage import open_store
from crucible_record.codecs import CODEC_PRESETS
from crucible_record.verify import verify_run


def _record(path, preset: str, steps: int = 11, rows: int = 30, time_chunk: int = 4):
    """An open-ended run whose last block is partial (11 steps in blocks of 4)."""
    fields = {"w": cr.Field((rows, 6), torch.bfloat16), "g": cr.Field((rows,), torch.float32, every=2),
              "n": cr.Field((), torch.int64)}
    gen = torch.Generator().manual_seed(0)
    with cr.record(path, fields, layout=cr.Layout(time_chunk=time_chunk, row_chunk=7, codec=preset)) as rec:
        for step in range(steps):
            tensors = {"w": torch.randn(rows, 6, generator=gen).bfloat16(), "n": torch.tensor(step)}
            if step % 2 == 0:
                tensors["g"] = torch.randn(rows, generator=gen)
            rec.record(step, **tensors)
    return cr.open(path)


def _spy(monkeypatch) -> list:
    """Count the blocks shardio decodes."""
    calls = []
    real = blockread._decode_block

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(blockread, "_decode_block", counting)
    return calls


@pytest.mark.parametrize("preset", list(CODEC_PRESETS))
def test_same_values_as_zarr_for_every_selection_it_takes(tmp_path, preset, monkeypatch):
    t = _record(tmp_path / "run", preset)
    calls = _spy(monkeypatch)
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[0, 3, 17, 29]] = True
    for name in ("w", "g", "n"):
        field = t[name]
        assert blockread.block_layout(field.array)[0] is not None, name
        keys = [slice(None), slice(0, 4), slice(1, 3), slice(3, 9), slice(2, None), (slice(None), mask),
                (slice(5, 10), [4, 1, 1]), Ellipsis]
        for key in keys:
            if name == "n" and isinstance(key, tuple):
                continue
            before = len(calls)
            ours = field.numpy(key)
            selection, advanced = normalize_key(key, field.shape)
            expected = np.asarray(field.array.oindex[selection] if advanced else field.array[selection])
            assert len(calls) > before, (name, key)  # shardio read it, not zarr
            assert ours.flags.c_contiguous and ours.dtype == expected.dtype, (name, key)
            np.testing.assert_array_equal(ours, expected, err_msg=f"{name}{key}")


def test_partial_selections_read_only_their_inner_chunks(tmp_path, monkeypatch):
    """One token's trajectory or a strided slice touches a few inner chunks: only those are read
    (read_selection), no whole shard decoded; the values are zarr's."""
    t = _record(tmp_path / "run", "default")
    calls = _spy(monkeypatch)
    for key in ((slice(None), 5), (slice(None), slice(0, 7)), slice(0, 11, 2), 3, [1, 2]):
        assert torch.equal(t["w"][key].view(torch.uint16),
                           torch.from_numpy(np.asarray(t["w"].array.oindex[normalize_key(key, t["w"].shape)[0]]))
                           .view(torch.uint16)), key
    assert calls == []


def test_damaged_shard_is_an_error_not_a_fallback(tmp_path):
    t = _record(tmp_path / "run", "default")
    shard = tmp_path / "run" / "trajectory.zarr" / "w" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    t = cr.open(tmp_path / "run")
    with pytest.raises(cr.CrucibleError, match=r"^cannot read w rows 4-7: .*(checksum|decompress)"):
        t["w"][:]
    assert torch.equal(t["w"][:4].view(torch.uint16), t["w"][0:4].view(torch.uint16))  # other blocks read
    report = verify_run(tmp_path / "run")
    assert [p.split(":")[0] for p in report.problems] == ["w steps 4-7"]
    assert "ShardError" in report.problems[0]
    shard.unlink()
    with pytest.raises(cr.CrucibleError, match=r"w is damaged: the chunk holding rows 4-7 is missing"):
        cr.open(tmp_path / "run")["w"][:]
    assert verify_run(tmp_path / "run").problems == ["w steps 4-7: chunk file missing"]


def test_unmatched_layout_falls_back_to_zarr_and_says_so(tmp_path, caplog, monkeypatch):
    """An array shardio cannot decode (here: gzip, which it does not reproduce) is read by zarr,
    with the same values, and the reason is logged once."""
    from zarr.codecs import GzipCodec

    array = zarr.create_array(tmp_path / "a.zarr", shape=(8, 5), chunks=(4, 5), dtype="float32",
                              compressors=[GzipCodec()])
    values = np.arange(40, dtype="float32").reshape(8, 5)
    array[...] = values
    layout, why = blockread.block_layout(array)
    assert layout is None and "gzip" in why
    store = open_store(tmp_path)
    selection = (slice(0, 8, 1), slice(0, 5, 1))
    with caplog.at_level(logging.INFO, logger="crucible_record"):
        assert blockread.read_blocks(store, array, selection, "a") is None
        assert blockread.read_blocks(store, array, selection, "a") is None
    said = [r.getMessage() for r in caplog.records if "not shardio" in r.getMessage()]
    assert len(said) == 1 and "gzip" in said[0]


def test_split_blocks_fall_back(tmp_path):
    """A block split over several files (a field split among ranks) is not one shardio shard."""
    array = zarr.create_array(tmp_path / "a.zarr", shape=(8, 10, 3), chunks=(4, 5, 3), shards=(4, 5, 3),
                              dtype="uint16")
    assert blockread.block_layout(array) == (None, "a time block is split over several files (a field split among ranks)")


def test_write_fallback_to_zarr_says_so(tmp_path, caplog):
    """encode_block on a layout shardio does not reproduce: zarr's pipeline writes the block (the
    same bytes zarr writes itself), and the reason is logged once."""
    from zarr.codecs import GzipCodec

    from crucible_record.format.blocks import encode_block

    array = zarr.create_array(tmp_path / "a.zarr", name="a", shape=(8, 5), chunks=(4, 5), dtype="float32",
                              compressors=[GzipCodec()], fill_value=0.0)
    values = np.arange(20, dtype="float32").reshape(4, 5)
    with caplog.at_level(logging.INFO, logger="crucible_record"):
        first = encode_block(array, 1, values)
        second = encode_block(array, 1, values)
    array[4:8] = values
    assert first == second == {"a/c/1/0": (tmp_path / "a.zarr" / "a" / "c" / "1" / "0").read_bytes()}
    said = [r.getMessage() for r in caplog.records if "written through zarr-python" in r.getMessage()]
    assert len(said) == 1 and "gzip" in said[0]


@pytest.mark.parametrize("preset", list(CODEC_PRESETS))
def test_one_token_reads_only_its_inner_chunks(tmp_path, preset, monkeypatch):
    """W[a:b, tok] goes through read_one_row (two rounds of ranged reads, no whole shard decoded)
    and equals zarr's values, partial last block included."""
    t = _record(tmp_path / "run", preset)
    calls = _spy(monkeypatch)
    used = []
    real = blockread.read_one_row
    monkeypatch.setattr(blockread, "read_one_row", lambda *a: used.append(a[2]) or real(*a))
    monkeypatch.setattr(cr.reader, "read_one_row", blockread.read_one_row)
    field = t["w"]
    for key in [(slice(None), 0), (slice(None), 29), (slice(2, 10), 13), (slice(8, 11), -1), (slice(5, 6), 7)]:
        selection, _ = normalize_key(key, field.shape)
        assert blockread.wants_one_row(selection, field.shape)
        np.testing.assert_array_equal(field.numpy(key), np.asarray(field.array[selection]), err_msg=str(key))
    assert len(used) == 5 and calls == []


def test_one_token_read_of_a_damaged_shard_is_an_error(tmp_path):
    t = _record(tmp_path / "run", "default")
    shard = tmp_path / "run" / "trajectory.zarr" / "w" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index (at the end of the file)
    shard.write_bytes(bytes(data))
    with pytest.raises(cr.CrucibleError, match=r"^cannot read w rows 4-7: shard index checksum mismatch"):
        cr.open(tmp_path / "run")["w"][:, 3]
    shard.unlink()
    with pytest.raises(cr.CrucibleError, match=r"^w is damaged: the chunk holding rows 4-7 is missing"):
        cr.open(tmp_path / "run")["w"][:, 3]
    assert t["w"][:4, 3].shape == (4, 6)  # the blocks before it still read


def _selections(shape, rng, count: int = 40) -> list:
    """Random normalized-able keys: ints, slices of any step (negative too), one list per key."""
    keys = []
    for _ in range(count):
        key = []
        list_axis = int(rng.integers(-1, len(shape)))
        for axis, n in enumerate(shape):
            kind = int(rng.integers(0, 4))
            if axis == list_axis:
                key.append(rng.integers(0, n, int(rng.integers(1, 5))).tolist())
            elif kind == 0:
                key.append(int(rng.integers(-n, n)))
            elif kind == 1:
                a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
                key.append(slice(a, b, int(rng.integers(1, 4))))
            elif kind == 2:
                key.append(slice(None, None, -int(rng.integers(1, 3))))
            else:
                key.append(slice(None))
        keys.append(tuple(key))
    return keys


@pytest.mark.parametrize("shards,chunks", [((4, 8, 3), (4, 4, 3)), ((4, 12, 3), (4, 3, 3)), ((4, 5, 3), (4, 5, 3))])
def test_any_selection_reads_the_inner_chunks_it_touches(tmp_path, shards, chunks):
    """read_selection equals numpy on the whole array for random selections, also where a block is
    split over several shard files (a field split among ranks) and where a shard's last inner
    chunks lie past the array's end (absent from its index, legitimately)."""
    values = np.random.default_rng(1).integers(0, 60000, (11, 10, 3)).astype(np.uint16)
    array = zarr.create_array(zarr.storage.LocalStore(tmp_path / "trajectory.zarr"), name="a", shape=values.shape,
                              shards=shards, chunks=chunks, dtype="uint16", fill_value=7,
                              config={"write_empty_chunks": True})
    array[...] = values
    array = zarr.open_array(zarr.storage.LocalStore(tmp_path / "trajectory.zarr", read_only=True), path="a")
    store = open_store(tmp_path)
    for key in _selections(values.shape, np.random.default_rng(2)):
        selection, _ = normalize_key(key, values.shape)
        got = blockread.read_selection(store, array, selection, "a")
        expected = values
        for axis in reversed(range(len(key))):  # orthogonal, axis by axis
            k = key[axis]
            expected = np.take(expected, k, axis=axis) if not isinstance(k, slice) else \
                expected[(slice(None),) * axis + (k,)]
        assert got.shape == expected.shape and np.array_equal(got, expected), key
