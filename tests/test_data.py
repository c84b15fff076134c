import itertools

import pytest

from corrsteer_pl.data import ShardedBatches
from corrsteer_pl.tasks import Example
from corrsteer_pl.tiny import tiny_tokenizer

EXAMPLES = [Example(f"x/{i}", f"Question {i}\nAnswer:", "A") for i in range(9)]


def test_shards_cover_every_example_once_with_equal_batch_counts():
    tok = tiny_tokenizer()
    shards = [ShardedBatches(EXAMPLES, 2, tok, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    seen = [e.id for shard in shards for batch in shard for e in batch["examples"]]
    assert sorted(seen) == sorted(e.id for e in EXAMPLES)


def test_batches_group_prompts_of_similar_length_longest_first():
    tok = tiny_tokenizer()
    mixed = [Example(f"m/{i}", "word " * (i * 7 % 10) + "Answer:", "A") for i in range(10)]
    batches = list(ShardedBatches(mixed, 3, tok))
    real = [batch["attention_mask"].sum(dim=1).tolist() for batch in batches]
    assert all(min(a) >= max(b) for a, b in itertools.pairwise(real))  # no long row beside a short one
    assert sum(batch["input_ids"].numel() for batch in batches) < len(mixed) * max(max(r) for r in real)
    assert sorted(e.id for batch in batches for e in batch["examples"]) == sorted(e.id for e in mixed)


def test_resume_starts_after_the_completed_batches():
    batches = ShardedBatches(EXAMPLES, 2, tiny_tokenizer())
    batches.load_state_dict({"completed": 3})
    assert [b["index"] for b in batches] == [3, 4]


def test_chat_template_wraps_the_prompt_as_one_user_turn():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    batch = ShardedBatches(EXAMPLES[:1], 1, tok, chat_template=True).collate(EXAMPLES[:1], 0)
    text = tok.decode(batch["input_ids"][0])
    assert text == "<|user|>Question 0\nAnswer:<|assistant|>"
    raw = ShardedBatches(EXAMPLES[:1], 1, tok).collate(EXAMPLES[:1], 0)
    assert tok.decode(raw["input_ids"][0]) == "Question 0\nAnswer:"


def test_chat_template_without_one_in_the_tokenizer_is_refused():
    with pytest.raises(ValueError, match="no chat template"):
        ShardedBatches(EXAMPLES[:1], 1, tiny_tokenizer(), chat_template=True).collate(EXAMPLES[:1], 0)
