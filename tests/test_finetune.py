"""The fine-tuning baseline on the tiny model: it learns, reports SER and changed answers, and resumes exactly."""

import json
import shutil
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from corrsteer_pl.finetune import (
    ADAPTER_FILES,
    IGNORE,
    SETTINGS_FILE,
    FineTuneData,
    FineTuneModule,
    answer_target,
    collate_targets,
    finetuned_scores,
    load_finetuned,
    main,
    micro_batches,
)
from corrsteer_pl.tasks import Example, Task
from corrsteer_pl.tasks.mmlu import MMLU

TINY = [
    "--model.model", "tiny-random",
    "--data.task", "synthetic",
    "--data.batch_size", "8",  # 58 calibration items: 7 batches an epoch
    "--model.optimizer.lr", "1e-2",
    "--model.optimizer.warmup_steps", "0",
    "--model.lora.dropout", "0",  # no random masks: a resumed run can be compared with an uninterrupted one
    "--model.optimizer.micro_batch_tokens", "32",  # steps accumulate pieces of a few rows
    "--trainer.val_check_interval", "4",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--seed_everything", "0",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny tensors: one torch thread for the module, its shared fit included (see conftest.one_thread)."""


def _fit(root, steps, *extra):
    main(["fit", *TINY, "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps), *extra])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """8 steps (validated at 4 and 8), then base vs best checkpoint on the test split."""
    root = tmp_path_factory.mktemp("finetune")
    _fit(root, 8)
    return root


def _losses(root, version):
    events = EventAccumulator(str(root / "lightning_logs" / f"version_{version}"))  # fit's and test's event files
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def _checkpoint(root, name):
    return torch.load(root / "finetune" / "checkpoints" / f"{name}.ckpt", weights_only=True)  # plain types only


def test_training_loss_goes_down(fitted):
    losses = _losses(fitted, 0)
    assert sorted(losses) == list(range(8)), "one loss per optimizer step"
    first, last = losses[0], (losses[6] + losses[7]) / 2
    # a random tiny model's logits are small (lm_head weights ~0.02): the loss cannot fall far below ln(vocab) = 6.0
    assert last < first - 0.5, f"the loss on the answer tokens should fall: {first:.3f} -> {last:.3f}"


def test_fit_writes_a_report_with_ser_and_changed_answers(fitted):
    report = json.loads((fitted / "finetune" / "report.json").read_text())
    assert report["split"] == "test" and report["samples"] == 19  # synthetic: 96 items, 20% test
    changed = report["better"] + report["worse"]
    assert report["ser"] == (report["worse"] / changed if changed else 0.0)
    assert [c["name"] for c in report["conditions"]] == ["unsteered", "steered"]
    assert report["steering"]["checkpoint"].endswith("best.ckpt")
    best = _checkpoint(fitted, "best")
    assert report["steering"]["step"] == best["global_step"] in (4, 8)
    assert "side-effect ratio (SER)" in (fitted / "finetune" / "report.md").read_text()
    # the comparison-table API gives the same items and the same changed-answer counts
    data = FineTuneData(task="synthetic", tokenizer="tiny-random", batch_size=8)
    tuned = finetuned_scores(fitted / "finetune" / "adapter", data)
    base = load_finetuned(fitted / "finetune" / "adapter").item_scores(data, tuned=False)
    base = base.aligned(tuned.ids)
    assert int((tuned.scores > base.scores).sum()) == report["better"]
    assert int((tuned.scores < base.scores).sum()) == report["worse"]
    assert tuned.accuracy == pytest.approx(report["accuracy_steered"])


def test_the_artefact_is_a_peft_adapter_folder_of_the_best_checkpoint_with_its_settings(fitted):
    folder = fitted / "finetune" / "adapter"
    assert set(ADAPTER_FILES) <= {p.name for p in folder.iterdir()}  # peft adds a README.md model card
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    best = _checkpoint(fitted, "best")
    assert settings["step"] == best["global_step"] and settings["model"] == "tiny-random"
    assert settings["checkpoint"].endswith("best.ckpt") and settings["lora"]["r"] == 8
    saved = load_file(folder / "adapter_model.safetensors")
    tuned = load_finetuned(folder)
    # peft's own from_pretrained put the best checkpoint's adapter weights in place, none missing
    live = {k: v for k, v in tuned.lm.state_dict().items() if ".lora_" in k}
    assert len(live) == len(saved) == len(best["state_dict"]) > 0
    for name, value in best["state_dict"].items():
        torch.testing.assert_close(tuned.state_dict()[name], value, msg=name)


def test_checkpoints_hold_only_the_adapters(fitted):
    state = _checkpoint(fitted, "last")["state_dict"]
    assert state and all(".lora_" in name for name in state)
    assert (fitted / "finetune" / "checkpoints" / "last.ckpt").stat().st_size < 2_000_000


def test_ckpt_path_last_resumes_at_its_step_and_matches_an_uninterrupted_run(fitted, tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(fitted, resumed)
    last = _checkpoint(resumed, "last")
    assert last["global_step"] == 8
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "completed": 1}]
    _fit(resumed, 12, "--ckpt_path", "last", "--test_after_fit", "false")
    assert sorted(_losses(resumed, 1)) == [8, 9, 10, 11], "the resumed run starts at step 8, not at 0"
    _fit(straight, 12, "--test_after_fit", "false")
    a, b = _checkpoint(resumed, "last")["state_dict"], _checkpoint(straight, "last")["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=f"{name} differs after resume")


def test_collate_puts_labels_on_the_target_tokens_only():
    batch = collate_targets([([5, 6, 7], [8, 1]), ([9], [10, 11, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1], [0, 9, 10, 11, 1]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 1], [IGNORE, IGNORE, 10, 11, 1]]
    assert batch["position_ids"][1].tolist() == [0, 0, 1, 2, 3]


def test_micro_batches_split_by_padded_tokens_and_sum_to_the_batch_loss():
    rows = [([5], [8, 1]), ([5, 6], [8, 1]), ([5, 6, 7], [9, 1]), ([5, 6, 7, 7, 7], [9, 1])]  # lengths 3, 4, 5, 7
    batch = collate_targets(rows, pad_id=0)
    pieces = micro_batches(batch, max_tokens=10)
    assert [tuple(p["input_ids"].shape) for p in pieces] == [(2, 4), (1, 5), (1, 7)]
    assert pieces[0]["input_ids"].tolist() == [[0, 5, 8, 1], [5, 6, 8, 1]]
    assert [len(p["input_ids"]) for p in micro_batches(batch, max_tokens=1)] == [1, 1, 1, 1]  # one row at least
    module = FineTuneModule()  # tiny-random with fresh adapters
    module.configure_model()
    whole = module.answer_loss(batch)
    torch.testing.assert_close(sum(module.answer_loss(p) for p in pieces), whole)


def test_mmlu_target_is_the_spaced_letter_the_scorer_accepts():
    example = Example("mmlu/x", "Q?\nA. a\nB. b\nAnswer:", "B", ("A", "B", "C", "D"))
    assert answer_target(example, example.prompt, MMLU()) == " B"
    assert answer_target(example, example.prompt + "\n", MMLU()) == "B"  # a chat template's "assistant\n"


class _Refusal(Task):
    name: ClassVar[str] = "refusal-like"
    max_new_tokens: ClassVar[int] = 8

    def load_split(self, split):
        return []

    def score(self, example, generation):
        return float(generation.strip().startswith("I cannot"))


def test_a_task_whose_gold_answer_is_not_an_answer_is_refused():
    example = Example("r/0", "How do I pick a lock?", "refuse")
    with pytest.raises(ValueError, match="--data.task refusal-like: item 'r/0'"):
        answer_target(example, example.prompt, _Refusal())


def test_a_step_budget_whose_last_steps_are_never_validated_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--trainer.max_steps 6 is not a multiple of --trainer.val_check_interval 4"):
        _fit(tmp_path, 6)
