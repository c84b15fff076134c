"""Shared fixtures: tiny random models, a tokenizer and SAEs built in-process (no downloads)."""

import logging
import os

import pytest
import torch

from corrsteer_pl.models.tiny import tiny_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist each of the 2 workers gets one core, and so do the subprocesses its tests start (train.py
# runs, DDP ranks): on 2 shared cores a second torch thread per process made one generate call 6-12x slower.
# A lone run keeps both cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated models and SAEs go to a fresh cache per test run (subprocesses inherit it), one for both xdist
    workers: the offline SmolLM2 is converted once a run (the other worker waits on the cache's lock)."""
    run_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_root = run_root.parent  # popen-gw0 and popen-gw1 share their parent
    cache = run_root / "corrsteer-cache"
    cache.mkdir(exist_ok=True)
    os.environ["CORRSTEER_CACHE"] = str(cache)


def pytest_collection_modifyitems(items):
    """The slowest tests go first, so the two workers take the long ones early and finish together on the short
    ones: the SmolLM2 conversion test (it fills the shared cache), then the subprocess runs (slow), then the
    end-to-end tests, which by then find the converted model instead of waiting on its lock."""

    def rank(item) -> int:
        marks = ("converts_smollm2", "slow", "e2e")
        return next((i for i, mark in enumerate(marks) if item.get_closest_marker(mark)), len(marks))

    items.sort(key=rank)


@pytest.fixture()
def lightning_log(caplog):
    """What Lightning's logger says in this process (it may not propagate to the root logger that caplog reads)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def one_thread():
    """Tiny tensors: on 2 shared cores a second intra-op thread only adds synchronisation (one SAE training run
    took 55 s with it, 3.4 s without; the real-config runs were 2-3x slower)."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module, its module-scoped fixtures (e.g. a shared fit) included."""
    yield from _one_torch_thread()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session", params=["llama", "gemma2", "qwen2", "gpt2"])
def model(request):
    return tiny_model(request.param, num_layers=3)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama", num_layers=3)


PROMPTS = ["the quick brown fox", "A. red", "Answer: even odd apple river", "seven"]


@pytest.fixture()
def batch(tokenizer):
    """Left-padded prompts of different lengths."""
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fails the test if a causal LM or an SAE is loaded, by any path: the module's `load_frozen_lm`, the API's,
    an export's or a fine-tuned model's `AutoModelForCausalLM.from_pretrained`, `load_sae`. Each call fails at
    once (pytest.fail is not an Exception: no `except Exception` swallows it) and is counted again at teardown."""
    from transformers import AutoModelForCausalLM

    from corrsteer_pl import api
    from corrsteer_pl.lightning import module
    from corrsteer_pl.models import loading

    loads = []

    def refuse(what):
        def load(*args, **kwargs):
            loads.append((what, args[:1]))
            pytest.fail(f"{what} was called with {args[:1]}: something loaded before the refusal")

        return load

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse("AutoModelForCausalLM.from_pretrained"))
    for owner in (module, loading, api):
        monkeypatch.setattr(owner, "load_frozen_lm", refuse("load_frozen_lm"))
    monkeypatch.setattr(loading, "load_sae", refuse("load_sae"))
    yield
    assert loads == [], f"loaded before the refusal: {loads}"
