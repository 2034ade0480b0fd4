"""The CUDA path of the recorder (pinned staging, copies on the device's stream, rows selected on
the device). Skipped without CUDA; benchmarks/gpu_check.sh runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import crucible_record as cr
from crucible_record.writer import default_writer_threads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_tensors_are_recorded_bit_exact(tmp_path):
    rows = torch.tensor([3, 0, 250, 17])
    fields = {"w": cr.Field((300, 16), torch.bfloat16), "some": cr.Field((300, 16), torch.float32, rows=rows),
              "loss": cr.Field((), torch.float32), "g": cr.Field((300,), torch.float16, every=3)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    sent = []
    with cr.record(tmp_path / "run", fields, layout=cr.Layout(time_chunk=4, row_chunk=64)) as rec:
        for step in range(10):
            w = torch.randn(300, 16, device="cuda", generator=gen)
            tensors = {"w": w.bfloat16(), "some": w, "loss": w.mean()}
            if step % 3 == 0:
                tensors["g"] = w.norm(dim=1).half()
            sent.append({k: v.cpu() for k, v in tensors.items()})  # the expectation: before the change below
            rec.record(step, **tensors)
            for tensor in tensors.values():  # the caller reuses its buffers at once: the copy must not see this
                tensor.add_(1)
        assert rec.writer_threads == default_writer_threads(on_gpu=True)
    t = cr.open(tmp_path / "run")
    assert torch.equal(t["w"][:].view(torch.uint16), torch.stack([s["w"] for s in sent]).view(torch.uint16))
    assert torch.equal(t["some"][:], torch.stack([s["some"][rows] for s in sent]))
    assert torch.equal(t["loss"][:], torch.stack([s["loss"] for s in sent]))
    assert torch.equal(t["g"][:], torch.stack([s["g"] for s in sent[::3]]))
