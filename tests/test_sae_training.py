import functools
import json
import re

import pytest
import torch
from sae_lens import SAE, TopKSAE
from sae_lens.training import sae_trainer
from tqdm.auto import tqdm

from corrsteer_pl.calibration.answer_cache import AnswerCache, letter_ids
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models import sae_training
from corrsteer_pl.models.sae_training import (
    METRICS_FILE,
    SAETrainingConfig,
    collect_activations,
    explained_variance,
    prepare_saes,
    train_topk_sae,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "A. red",
    "Question: which option is correct? Answer:",
    "seven",
    "one two three four five six",
]


def _unpadded(model, tokenizer, texts, layer):
    """What output_hidden_states reports for the layer's output, text by text, without each text's first token."""
    rows = []
    for text in texts:
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[layer + 1]
        rows.append(hidden[0, 1:])
    return torch.cat(rows)


def test_collected_activations_equal_unpadded_hidden_states_without_the_first_token(model, tokenizer):
    acts = collect_activations(model, tokenizer, TEXTS, [0, 1], max_tokens=10_000, batch_size=3)
    for layer in (0, 1):
        torch.testing.assert_close(acts[layer], _unpadded(model, tokenizer, TEXTS, layer))


def test_collection_stops_at_the_token_budget(llama, tokenizer):
    full = collect_activations(llama, tokenizer, TEXTS, [1], max_tokens=10_000, batch_size=2)[1]
    capped = collect_activations(llama, tokenizer, TEXTS, [1], max_tokens=7, batch_size=2)[1]
    assert torch.equal(capped, full[:7])


def test_answer_rows_equal_greedy_generate_and_last_position_hidden_states(model, tokenizer):
    cache = AnswerCache(logit_ids=letter_ids(tokenizer))
    acts = collect_activations(model, tokenizer, TEXTS, [0, 1], max_tokens=7, batch_size=2, answers=cache)
    assert torch.equal(acts[1], collect_activations(model, tokenizer, TEXTS, [1], 7, 2)[1]), "budget unchanged"
    assert len(cache) == len(TEXTS), "every text is read, past the token budget too"
    for text in TEXTS:
        (row,) = cache.rows([text], [0, 1]).tolist()
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
            greedy = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1]
        assert cache.tokens[row] == greedy
        torch.testing.assert_close(cache.logits[row], out.logits[0, -1, cache.logit_ids], msg="letter logits")
        for layer in (0, 1):
            torch.testing.assert_close(cache.residuals[layer][row], out.hidden_states[layer + 1][0, -1])
    assert cache.rows(["a prompt never read"], [0]) is None and cache.rows(TEXTS, [0, 2]) is None


def test_answer_cache_reloads_identically_and_refuses_a_damaged_file(tmp_path):
    cache = AnswerCache(logit_ids=torch.tensor([7, 9]))
    cache.add(["a", "b"], torch.tensor([3, 4]), {5: torch.randn(2, 8)}, torch.randn(2, 2))
    cache.save(tmp_path / "answers.safetensors")
    loaded = AnswerCache.load(tmp_path / "answers.safetensors")
    assert loaded.keys == cache.keys and torch.equal(loaded.tokens, cache.tokens)
    assert torch.equal(loaded.logit_ids, cache.logit_ids) and torch.equal(loaded.logits, cache.logits)
    assert torch.equal(loaded.residuals[5], cache.residuals[5]) and loaded.rows(["b"], [5]).tolist() == [1]
    short = AnswerCache(cache.keys, cache.tokens[:1], cache.residuals, cache.logit_ids, cache.logits)
    short.save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="delete it"):
        AnswerCache.load(tmp_path / "bad.safetensors")


def _sparse_data(n: int, d: int = 32, n_directions: int = 24, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Each row a non-negative mix of `active` of `n_directions` fixed unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_directions, d, generator=g), dim=1)
    codes = torch.zeros(n, n_directions)
    picked = torch.rand(n, n_directions, generator=g).argsort(dim=1)[:, :active]
    codes.scatter_(1, picked, torch.rand(n, active, generator=g) * 4 + 1)
    return codes @ directions + torch.randn(d, generator=g)


TINY = dict(d_sae=48, k=6, batch_size_tokens=256, epochs=20, lr=1e-2, holdout_fraction=0.1)


def test_topk_sae_learns_sparse_synthetic_activations_without_the_sinks():
    acts = _sparse_data(3000)
    acts[[10, 500, 2000]] *= 100  # attention-sink-like rows: dropped, not learned
    sae, metrics = train_topk_sae(acts, layer=3, cfg=SAETrainingConfig(layers=[3], **TINY))
    assert isinstance(sae, TopKSAE) and sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert metrics["explained_variance"] > 0.8
    assert metrics["outliers_dropped"] == 3
    assert metrics["train_tokens"] == 2697 and metrics["holdout_tokens"] == 300


def test_explained_variance_is_measured_on_the_held_out_rows_only():
    acts = _sparse_data(3000)
    acts[-300:] = _sparse_data(300, seed=1)  # held-out rows: other directions the SAE never saw
    sae, metrics = train_topk_sae(acts, layer=0, cfg=SAETrainingConfig(layers=[0], **TINY))
    assert metrics["explained_variance"] == pytest.approx(explained_variance(sae, acts[-300:]))
    assert metrics["train_explained_variance"] > 0.8 > metrics["explained_variance"]


def test_prepare_saes_trains_missing_layers_only_and_saves_loadable_saes(llama, tokenizer, tmp_path, monkeypatch):
    trained = []
    train = sae_training.train_topk_sae
    monkeypatch.setattr(sae_training, "train_topk_sae", lambda *a: trained.append(a[1]) or train(*a))
    cfg = dict(d_sae=32, k=4, tokens=10_000, batch_size_tokens=16, epochs=2, prompts_per_batch=2)

    first = prepare_saes(llama, tokenizer, TEXTS * 4, SAETrainingConfig(layers=[0, 2], **cfg), tmp_path)
    mtime = (first[0] / "sae_weights.safetensors").stat().st_mtime_ns
    paths = prepare_saes(llama, tokenizer, TEXTS * 4, SAETrainingConfig(layers=[0, 1, 2], **cfg), tmp_path)

    assert trained == [0, 2, 1]
    assert (paths[0] / "sae_weights.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_0", "layer_1", "layer_2"]
    for layer, path in paths.items():
        sae = SAE.load_from_disk(path)
        assert isinstance(sae, TopKSAE) and sae.cfg.d_sae == 32 and sae.cfg.k == 4
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        metrics = json.loads((path / METRICS_FILE).read_text())
        assert metrics["outliers_dropped"] == 0  # so the held-out rows are the last rows collected
        acts = collect_activations(llama, tokenizer, TEXTS * 4, [layer], 10_000, 2)[layer]
        held = acts[-metrics["holdout_tokens"] :]
        assert metrics["explained_variance"] == pytest.approx(explained_variance(sae, held), abs=1e-5)


def test_prepare_saes_refuses_a_folder_with_another_width(llama, tokenizer, tmp_path):
    cfg = dict(layers=[1], k=4, tokens=10_000, batch_size_tokens=16, prompts_per_batch=2)
    prepare_saes(llama, tokenizer, TEXTS * 4, SAETrainingConfig(d_sae=32, **cfg), tmp_path)
    with pytest.raises(ValueError, match="delete it or use another folder"):
        prepare_saes(llama, tokenizer, TEXTS * 4, SAETrainingConfig(d_sae=64, **cfg), tmp_path)


def test_user_errors_name_the_fix(llama, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="name the layers"):
        SAETrainingConfig(layers=[])
    with pytest.raises(ValueError, match="layers 0..2"):
        prepare_saes(llama, tokenizer, TEXTS, SAETrainingConfig(layers=[3]), tmp_path)
    with pytest.raises(ValueError, match="calibration prompts"):
        collect_activations(llama, tokenizer, [], [0], 100)


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"layers": []}, "layers"), ({"layers": [0], "holdout_fraction": 1.0}, "holdout_fraction"),
     ({"layers": [0], "k": 0}, "k")],
)  # fmt: skip
def test_config_errors_name_the_flag(options, flag):
    with pytest.raises(ValueError, match=rf"^--model\.train_saes\.{flag} "):
        SAETrainingConfig(**options)


def test_fit_that_trains_saes_shows_each_sae_s_progress_and_result(tmp_path, monkeypatch, capsys, lightning_log):
    """Fewer than 100 steps per SAE (sae-lens moves its bar every 100): each bar still ends full, and each SAE
    gets one line with its time and held-out explained variance."""
    monkeypatch.setenv("CORRSTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sae_trainer, "tqdm", functools.partial(tqdm, mininterval=0, miniters=1))  # every update
    saes = {"layers": [0, 1], "d_sae": 64, "k": 4, "tokens": 2000, "batch_size_tokens": 32, "prompts_per_batch": 4}
    args = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--model.saes", "[]"]
    main(["fit", *args, "--model.train_saes", json.dumps(saes), "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    for layer in (0, 1):
        bars = re.findall(rf"Training SAE layer {layer}: +(\d+)%\|[^|]*\| (\d+)/(\d+)", err)
        assert bars and bars[-1][0] == "100" and bars[-1][1] == bars[-1][2], f"layer {layer}'s bar ends at {bars}"
        total = int(bars[-1][2])
        assert total // 32 < 100, "fewer steps than sae-lens's own bar moves by"
        shown = sorted({int(done) for _, done, _ in bars})
        assert shown == list(range(0, total + 1, 32)), "the bar moves one step (32 positions) at a time"
        (line,) = {m for m in lightning_log.messages if m.startswith(f"SAE layer {layer}: trained in ")}
        assert re.search(r"trained in \d+\.\d s on [\d,]+ positions; held-out explained variance -?\d\.\d{3}", line)
