"""Failures in the middle of an export: nothing half-written, and parity failures name the guilty block."""

from __future__ import annotations

import pytest

from seam.export import onnx_writer
from seam.export.exporter import ExportRequest, export
from seam.export.families.llama import LlamaFamily
from seam.export.validate import ParityError


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    real_export = onnx_writer.export_module
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_export(*args, **kwargs)

    monkeypatch.setattr(onnx_writer, "export_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ExportRequest(model="tiny-llama", out=tmp_path / "out", quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_names_block_and_output(tmp_path, monkeypatch):
    real_run_layer = LlamaFamily.run_layer

    def skewed(self, layer, hidden, *rest, **attention):
        output = real_run_layer(self, layer, hidden, *rest, **attention)
        return output + 0.05 if layer.self_attn.layer_idx == 2 else output

    monkeypatch.setattr(LlamaFamily, "run_layer", skewed)  # only the exported graphs see it
    with pytest.raises(ParityError) as error:
        export(ExportRequest(model="tiny-llama", out=tmp_path / "out", quiet=True))
    assert "block 2 (layers [2, 3)), output 'hidden_out'" in str(error.value)
    assert list(tmp_path.iterdir()) == []
