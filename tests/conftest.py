"""Shared fixtures: tiny random models, a tokenizer and SAEs built in-process (no downloads)."""

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
    """Generated models and SAEs go to a fresh cache per test session (subprocesses inherit it)."""
    os.environ["CORRSTEER_CACHE"] = str(tmp_path_factory.mktemp("corrsteer-cache"))


@pytest.fixture()
def one_thread():
    """Tiny tensors: on 2 shared cores a second intra-op thread only adds synchronisation (one SAE training run
    took 55 s with it, 3.4 s without; the real-config runs were 2-3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
