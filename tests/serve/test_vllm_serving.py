"""The vLLM plugin against our own generation, through the OpenAI API on loopback: token for token, per request,
in mixed batches, with chunked prefill on and off and with prefix caching on; bad steering arguments are HTTP 400s."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from corrsteer_pl.serve.launch import serving  # noqa: E402
from corrsteer_pl.serve.reference import reference_tokens, scaled  # noqa: E402

BLOCK = 32  # the smallest KV block vLLM's CPU attention takes
SERVERS = {
    # long prompts are split over steps of 64 tokens: a request's steered position may fall in any chunk
    "chunked": ("--enable-chunked-prefill", "--max-num-batched-tokens", "64"),
    "unchunked": ("--no-enable-chunked-prefill", "--max-num-batched-tokens", "256"),
}
COMMON = ("--max-model-len", "256", "--block-size", str(BLOCK), "--enable-prefix-caching", "--max-num-seqs", "32")
MAX_NEW = 12


@pytest.fixture(scope="module")
def servers(tiny_serving, tmp_path_factory):
    """name -> a running server (started on first use, one per configuration, all stopped after the module)."""
    running, stack = {}, ExitStack()

    def get(name: str):
        if name not in running:
            log = tmp_path_factory.mktemp("vllm") / f"{name}.log"
            args = (*COMMON, *SERVERS[name])
            running[name] = stack.enter_context(serving(tiny_serving.model_dir, tiny_serving.export_dir, log, args))
        return running[name]

    with stack:
        yield get


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _complete(server, model_dir, prompt: list[int], xargs: dict | None, max_tokens: int = MAX_NEW) -> list[int]:
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    body = {"return_token_ids": True, **({"vllm_xargs": xargs} if xargs is not None else {})}
    out = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=body)  # fmt: skip
    return list(out.choices[0].token_ids)


def _all_at_once(server, model_dir, jobs: list[tuple[list[int], dict | None]]) -> list[list[int]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: _complete(server, model_dir, *job), jobs))


def _hits(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as response:
        text = response.read().decode()
    return sum(float(m) for m in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.parametrize("name", list(SERVERS))
def test_a_mixed_batch_equals_each_requests_own_reference(servers, tiny_serving, name):
    """Steered (scale 1), unsteered and scale 0.5 requests in flight together, prompts of 2 to 150 tokens."""
    t = tiny_serving
    prompts = _prompts(t.vocab, [2, 5, 9, 17, 31, 33, 64, 150], seed=1)
    conditions = {
        "steered": ({}, 1.0),
        "unsteered": ({"corrsteer": False}, 0.0),
        "half": ({"corrsteer_scale": 0.5}, 0.5),
    }
    jobs = [(p, xargs) for xargs, _ in conditions.values() for p in prompts]
    served = _all_at_once(servers(name), t.model_dir, jobs)
    i = 0
    for label, (_, scale) in conditions.items():
        steering = scaled(t.steering, scale) if scale else None
        refs = reference_tokens(t.model, prompts, MAX_NEW, steering)
        got = served[i : i + len(prompts)]
        i += len(prompts)
        assert got == [r.tokens for r in refs], f"{name}, {label}"
    steered, unsteered = served[: len(prompts)], served[len(prompts) : 2 * len(prompts)]
    assert sum(a != b for a, b in zip(steered, unsteered, strict=True)) >= len(prompts) // 2, "the steering acts"


def test_all_positions_on_request_equals_our_all_policy(servers, tiny_serving):
    t = tiny_serving
    prompts = _prompts(t.vocab, [4, 40, 90], seed=2)
    served = _all_at_once(servers("chunked"), t.model_dir, [(p, {"corrsteer_positions": "all"}) for p in prompts])
    refs = reference_tokens(t.model, prompts, MAX_NEW, scaled(t.steering, 1.0, positions="all"))
    assert served == [r.tokens for r in refs]
    generation_only = reference_tokens(t.model, prompts, MAX_NEW, t.steering)
    assert served != [r.tokens for r in generation_only], "the policies differ on these prompts"


def _check_prefix_case(server, t, first: dict | None, second: dict | None, seed: int) -> float:
    """A runs `first` on an 80-token prompt P; B runs `second` on P + A's continuation: B equals its own
    reference. Returns the tokens B found in the prefix cache."""
    prompt = _prompts(t.vocab, [80], seed=seed)[0]
    a = _complete(server, t.model_dir, prompt, first, max_tokens=24)
    assert len(a) == 24, "no end-of-sequence inside the continuation (choose another seed)"
    before = _hits(server)
    b = _complete(server, t.model_dir, prompt + a, second, max_tokens=8)
    hits = _hits(server) - before
    steering = None if second == {"corrsteer": False} else t.steering
    assert b == reference_tokens(t.model, [prompt + a], 8, steering)[0].tokens
    return hits


def test_prefix_caching_never_hands_steered_kv_to_another_steering(servers, tiny_serving):
    """A steered from P's last position (79): blocks 0-1 (positions 0-63) are as unsteered and are shared; block
    2 (64-95) holds steered positions and is not handed to B, unsteered or steered from its own last position."""
    server = servers("chunked")
    assert _check_prefix_case(server, tiny_serving, {}, {"corrsteer": False}, seed=3) == 2 * BLOCK
    assert _check_prefix_case(server, tiny_serving, {}, {}, seed=4) == 2 * BLOCK
    assert _check_prefix_case(server, tiny_serving, {"corrsteer_scale": 0.5}, {}, seed=5) == 2 * BLOCK
    # A unsteered: B (steered from its position 103) may and does reuse all three of A's full blocks
    assert _check_prefix_case(server, tiny_serving, {"corrsteer": False}, {}, seed=6) == 3 * BLOCK


@pytest.mark.parametrize(
    ("xargs", "named"),
    [
        ({"corrsteer_scale": "strong"}, "vllm_xargs.corrsteer_scale: must be a finite number"),
        ({"corrsteer": 2}, "vllm_xargs.corrsteer: must be true or false"),
        ({"corrsteer_scal": 1}, "vllm_xargs.corrsteer_scal: unknown steering argument"),
        ({"corrsteer_positions": "prompt"}, "vllm_xargs.corrsteer_positions: must be 'generation' or 'all'"),
    ],
)
def test_a_bad_steering_argument_is_a_400_naming_it_and_the_server_goes_on(servers, tiny_serving, xargs, named):
    server = servers("chunked")
    with pytest.raises(openai.BadRequestError) as err:
        _complete(server, tiny_serving.model_dir, [5, 6, 7], xargs)
    assert err.value.status_code == 400 and named in str(err.value)
    assert len(_complete(server, tiny_serving.model_dir, [5, 6, 7], {"corrsteer_scale": 2})) > 0
