"""A TRL SFTTrainer with distillation: its fused LM head never builds the student's logits."""
from __future__ import annotations

import pytest
import torch
import transformers
from _hf import LENGTH, VOCAB, lm_data, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import kdhooks  # noqa: E402
from kdhooks.integrations.hf import with_distillation  # noqa: E402

transformers.logging.set_verbosity_error()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test vocabulary, built here (no hub)."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2",
                                   unk_token="w2", model_max_length=LENGTH)


def sft_trainer(tmp_path, kd_config: dict, max_steps: int = 12, teacher_vocab: int = VOCAB):
    items = lm_data(96, seed=1)
    dataset = datasets.Dataset.from_list([{"input_ids": item["input_ids"][item["attention_mask"].bool()].tolist()}
                                          for item in items])
    teacher, student = tiny_llama(2, 32, seed=1, vocab=teacher_vocab), tiny_llama(1, 16, seed=2)
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                         max_steps=max_steps, logging_steps=1, per_device_train_batch_size=8, learning_rate=1e-2,
                         lr_scheduler_type="constant", save_strategy="no", max_length=LENGTH)
    trainer = with_distillation(trl.SFTTrainer)(model=student, teacher=teacher, kd_config=kd_config, args=args,
                                               train_dataset=dataset, processing_class=word_tokenizer())
    return trainer, student, teacher


def test_lm_kd_forms_the_logits_from_the_fused_heads_hidden_states(tmp_path):
    config = {"task_weight": 0.0, "terms": [{"kind": "lm_kd", "divergence": "forward_kl",
                                             "student_head": "lm_head", "student_hidden": "model"}]}
    trainer, student, teacher = sft_trainer(tmp_path, config)
    forwards, teacher_kwargs = [], []
    student.register_forward_hook(lambda module, args, kwargs, out: forwards.append(sorted(kwargs)), with_kwargs=True)
    teacher.register_forward_hook(lambda module, args, kwargs, out: teacher_kwargs.append(sorted(kwargs)),
                                  with_kwargs=True)
    head_before = student.lm_head.weight.detach().clone()
    trainer.train()

    assert len(forwards) == 12 and all("fused_lm_head" in kwargs for kwargs in forwards)  # one forward a step
    assert len(teacher_kwargs) == 12 and not any("fused_lm_head" in k or "labels" in k for k in teacher_kwargs)
    log = [entry["distill/lm_kd"] for entry in trainer.state.log_history if "distill/lm_kd" in entry]
    print("lm_kd per step:", [round(v, 4) for v in log])
    assert len(log) == 12 and log[-1] < 0.7 * log[0]  # the student learns the teacher from lm_kd alone
    assert not torch.equal(head_before, student.lm_head.weight)  # through the head's weights


@pytest.mark.parametrize("term, location", [({"kind": "lm_kd"}, "terms[0].student"),
                                            ({"kind": "lm_kd", "student_head": "lm_head"}, "terms[0].student_head")])
def test_a_fused_head_without_student_hidden_fails_at_construction_with_the_fix(tmp_path, term, location):
    """The dry pass runs the student as SFTTrainer's loss does (fused_lm_head=True): lm_head never runs there."""
    with pytest.raises(kdhooks.ConfigError, match="fused LM head") as error:
        sft_trainer(tmp_path, {"terms": [term]}, max_steps=1)
    assert error.value.location == location
    assert "student_hidden" in error.value.fix and "`model`" in error.value.fix


def test_a_teacher_with_another_vocabulary_fails_at_construction(tmp_path):
    config = {"terms": [{"kind": "lm_kd", "student_head": "lm_head", "student_hidden": "model"}]}
    with pytest.raises(kdhooks.ConfigError, match=f"vocabulary has {VOCAB} entries and the teacher's {VOCAB + 8}"):
        sft_trainer(tmp_path, config, max_steps=1, teacher_vocab=VOCAB + 8)
