"""PEFT (LoRA) students: paths through PEFT's wrapper, DistillationTrainer and SFTTrainer with peft_config."""
from __future__ import annotations

import pytest
import torch
import transformers
from _hf import LENGTH, full_tensor_divergence, lm_data, tiny_llama, training_args

import kdhooks
from kdhooks.integrations.hf import DistillationTrainer, with_distillation

peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
KD = {"task_weight": 0.5, "terms": [{"kind": "lm_kd", "student_head": "lm_head", "student_hidden": "model"},
                                    {"kind": "hidden_states", "weight": 0.1}]}


def lora_llama(seed: int = 2) -> torch.nn.Module:
    return peft.get_peft_model(tiny_llama(1, 16, seed=seed), peft.LoraConfig(**LORA))


def batch_of(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_the_users_paths_resolve_through_peft_and_an_exact_path_wins():
    student = lora_llama()
    table = kdhooks.module_table(student)
    base = student.get_base_model()
    assert table["lm_head"] is base.lm_head and table["model"] is base.model
    assert table["model.layers.0.self_attn.q_proj"] is base.model.layers[0].self_attn.q_proj
    assert table["base_model"] is student.base_model  # exact: PEFT's LoraModel, not unwrapped
    # `model` is a wrapper only as PEFT's prefix `base_model.model.`, never a segment elsewhere
    assert "layers.0" not in table and "layers.0" not in kdhooks.module_table(tiny_llama(1, 16))
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(student, tiny_llama(2, 32, seed=1),
                          {"terms": [{"kind": "fitnets", "student": "model.norn", "teacher": "model.norm"}]})
    assert error.value.location == "terms[0].student" and "'model.norm'" in error.value.fix


def test_a_hidden_output_without_last_hidden_state_is_a_config_error_naming_the_field():
    """`base_model.model` is PEFT's copy of the whole LM: its output has loss and logits, no hidden states."""
    batch = batch_of(lm_data(2, seed=0))
    config = {"terms": [{"kind": "lm_kd", "student_head": "lm_head", "student_hidden": "base_model.model"}]}
    with pytest.raises(kdhooks.ConfigError, match="without a `last_hidden_state` field") as error:
        kdhooks.Distiller(lora_llama(), tiny_llama(2, 32, seed=1), config, example_inputs=batch)
    assert error.value.location == "terms[0].student_hidden" and "logits" in error.value.problem
    assert "`model`" in error.value.fix


def trained_apart(student: torch.nn.Module, before: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """The names of the student's parameters that changed, and of those that did not."""
    after = dict(student.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    return changed, set(before) - changed


def test_a_lora_student_under_the_distillation_trainer(tmp_path):
    teacher, student = tiny_llama(2, 32, seed=1), lora_llama()
    items = lm_data(16, seed=4)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=KD, train_dataset=items,
                                  args=training_args(tmp_path, per_device_train_batch_size=8, max_steps=4,
                                                     logging_steps=1, learning_rate=1e-2,
                                                     train_sampling_strategy="sequential"))
    connector = [p.detach().clone() for p in trainer.distiller.parameters()]
    assert connector
    student.eval()  # a forward outside training: the Distiller records nothing
    with torch.no_grad():  # LoRA's B starts at 0: the student starts as its base model
        batch = batch_of(items[:8])
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trainer.train()

    changed, unchanged = trained_apart(student, before)
    assert changed and all("lora_" in name for name in changed)
    assert all("lora_" not in name for name in unchanged)  # every LoRA weight trained, nothing else
    assert all(not torch.equal(b, p) for b, p in zip(connector, trainer.distiller.parameters()))
    assert all(torch.equal(b, p) for b, p in zip(teacher_before, teacher.parameters()))
    first = [entry for entry in trainer.state.log_history if "distill/lm_kd" in entry][0]
    expected = full_tensor_divergence(student_logits, teacher_logits, batch["labels"], batch["attention_mask"],
                                      "forward_kl", 0.5, 1.0)
    assert first["distill/lm_kd"] == pytest.approx(expected, rel=1e-5)
    trainer.distiller.close()


trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_a_lora_student_under_sft_trainer_with_peft_config(tmp_path):
    from test_hf_trl import word_tokenizer

    items = lm_data(48, seed=1)
    dataset = datasets.Dataset.from_list([{"input_ids": item["input_ids"][item["attention_mask"].bool()].tolist()}
                                          for item in items])
    teacher, student = tiny_llama(2, 32, seed=1), tiny_llama(1, 16, seed=2)
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                         max_steps=4, logging_steps=1, per_device_train_batch_size=8, learning_rate=1e-2,
                         lr_scheduler_type="constant", save_strategy="no", max_length=LENGTH)
    trainer = with_distillation(trl.SFTTrainer)(model=student, teacher=teacher, kd_config=KD, args=args,
                                               train_dataset=dataset, processing_class=word_tokenizer(),
                                               peft_config=peft.LoraConfig(**LORA))
    assert isinstance(trainer.model, peft.PeftModel) and trainer.distiller.student is trainer.model
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    connector = [p.detach().clone() for p in trainer.distiller.parameters()]
    trainer.train()

    changed, unchanged = trained_apart(trainer.model, before)
    assert changed and all("lora_" in name for name in changed)
    assert all("lora_" not in name for name in unchanged)
    assert all(not torch.equal(b, p) for b, p in zip(connector, trainer.distiller.parameters()))
    log = [entry for entry in trainer.state.log_history if "distill/lm_kd" in entry]
    assert len(log) == 4 and all(entry["distill/lm_kd"] > 0 and entry["distill/hidden_states"] > 0 for entry in log)
    trainer.distiller.close()
