"""Other Zarr v3 readers open a store written with the default preset, unchanged."""

from __future__ import annotations

import numpy as np

from crucible_record.crucible3 import open_trajectory


def test_tensorstore_reads_default_store(tiny_run):
    import tensorstore as ts
    t = open_trajectory(tiny_run)
    path = str(tiny_run / "trajectory.zarr")
    W = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path + "/W"}}, read=True).result()
    assert W.domain.labels == ("step", "token", "hidden")
    assert np.array_equal(W[: t.steps + 1].read().result(), t.W.numpy(slice(None)))
    loss = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path + "/loss"}}, read=True).result()
    assert np.array_equal(loss[1 : t.steps + 1].read().result(), t.loss[1:].numpy())
