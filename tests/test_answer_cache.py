"""One-token calibration from the rows recorded while training SAEs equals calibration that runs the model."""

import json

import torch
from safetensors.torch import load_file

from corrsteer_pl.calibration import calibration as capture  # where calibration answers
from corrsteer_pl.calibration.answer_cache import ANSWERS_FILE
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.sources import cache_dir
from corrsteer_pl.steering.vectors import SteeringVectors

SAES = {"layers": [0, 1], "d_sae": 64, "k": 4, "tokens": 2000, "batch_size_tokens": 32, "prompts_per_batch": 4}
ARGS = [
    "--config", "configs/tiny.yaml",
    "--trainer.enable_progress_bar", "false",
    "--model.saes", "[]",
    "--model.train_saes", json.dumps(SAES),
    "--data.task", "Synthetic", "--data.task.max_new_tokens", "1",
]  # fmt: skip


def test_calibration_from_cached_answers_equals_running_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRSTEER_CACHE", str(tmp_path / "cache"))  # its SAEs and answers alone in the cache
    calls = []
    live = capture.generate_answers
    monkeypatch.setattr(capture, "generate_answers", lambda *a, **k: calls.append(1) or live(*a, **k))

    main(["fit", *ARGS, "--trainer.default_root_dir", str(tmp_path / "cached")])
    assert calls == [], "with answers cached, calibration never runs the LM"
    (answers,) = cache_dir().glob(f"saes/*/*/{ANSWERS_FILE}")
    answers.unlink()  # same SAEs (cached), but now calibration has to run the model
    main(["fit", *ARGS, "--trainer.default_root_dir", str(tmp_path / "live")])
    assert calls, "without the cache, calibration runs the LM"

    cached, ran = (load_file(tmp_path / run / "steered" / "statistics.safetensors") for run in ("cached", "live"))
    assert cached.keys() == ran.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], ran[name], rtol=1e-5, atol=1e-6, msg=name)
    a, b = (SteeringVectors.load(tmp_path / run / "steered") for run in ("cached", "live"))
    assert a.layers.keys() == b.layers.keys()
    for layer in a.layers:
        assert [f.feature for f in a.layers[layer].features] == [f.feature for f in b.layers[layer].features]
        torch.testing.assert_close(a.layers[layer].vector, b.layers[layer].vector)
