"""A server given a bad export refuses to start with one line naming the file and the fix, before any worker."""

from __future__ import annotations

import subprocess

import pytest

pytest.importorskip("vllm")

from corrsteer_pl.serve.launch import free_port, server_command, server_env  # noqa: E402

from .conftest import D_MODEL, NUM_LAYERS, make_export  # noqa: E402


def _refusal(model_dir, export) -> str:
    """The server's last line of output, after checking that it exited with status 1 and printed no traceback."""
    run = subprocess.run(
        server_command(model_dir, free_port()), env=server_env(export), capture_output=True, text=True, timeout=300
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    return output.strip().splitlines()[-1]


def _bad_exports(root):
    corrupt_vectors = make_export(root / "corrupt-vectors", D_MODEL, NUM_LAYERS, {1: 1.0})
    (corrupt_vectors / "steering.safetensors").write_bytes(b"not a safetensors file")
    not_json = make_export(root / "not-json", D_MODEL, NUM_LAYERS, {1: 1.0})
    (not_json / "steering.json").write_text("{ cut short")
    return {
        "missing folder": (root / "nowhere", "CORRSTEER_STEERING=", "no such folder; set CORRSTEER_STEERING"),
        "corrupt vectors": (corrupt_vectors, "steering.safetensors is corrupt", "export again"),
        "corrupt json": (not_json, "steering.json is not valid JSON", "export again"),
        "another width": (
            make_export(root / "width", 128, NUM_LAYERS, {1: 1.0}), "steering.json: made for",
            "has width 256: serve the model it was made for",
        ),
        "another layer count": (
            make_export(root / "depth", D_MODEL, 30, {1: 1.0}), "steering.json: made for",
            "has 3 layers: serve the model it was made for",
        ),
        "a layer the model lacks": (
            make_export(root / "layer", D_MODEL, 30, {24: 1.0}), "steering.json: layer 24 does not exist",
            "(layers 0..2)",
        ),
    }  # fmt: skip


def test_bad_exports_refuse_to_start_with_one_line(tiny_serving, tmp_path):
    for case, (export, names, fix) in _bad_exports(tmp_path).items():
        line = _refusal(tiny_serving.model_dir, export)
        assert line.startswith("corrsteer: ") and names in line and fix in line, f"{case}: {line}"
