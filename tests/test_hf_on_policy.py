"""On-policy distillation (GKD, Agarwal et al. 2024) in any HF Trainer: the `on_policy:` config key."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _hf import LENGTH, full_tensor_divergence, lm_data, tiny_gpt2, tiny_llama, training_args

import kdhooks
from kdhooks.integrations.hf import DistillationTrainer, with_distillation

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning",
                                        "ignore:`gradient_checkpointing_kwargs` is deprecated:FutureWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
                                        "ignore:You are importing from 'trl.experimental'")

PROMPT = 3  # lm_data's prompt: the start token and two numbers (label -100)
GKD = {"kind": "lm_kd", "divergence": "jsd", "beta": 0.3, "temperature_squared": False}


def config(**on_policy) -> dict:
    return {"task_weight": 0.0, "on_policy": {"max_new_tokens": 4, **on_policy}, "terms": [GKD]}


def sharp_teacher(seed: int = 1) -> torch.nn.Module:
    """A random teacher made confident, so divergences are well above float32 rounding."""
    teacher = tiny_llama(2, 32, seed=seed)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    return teacher


def trainer_for(student, teacher, kd_config, tmp_path, steps: int = 4, **overrides) -> DistillationTrainer:
    options = dict(per_device_train_batch_size=4, max_steps=steps, logging_steps=1, learning_rate=1e-2,
                   train_sampling_strategy="sequential")
    return DistillationTrainer(model=student, teacher=teacher, kd_config=kd_config, train_dataset=lm_data(32, seed=1),
                               args=training_args(tmp_path, **{**options, **overrides}))


def count_generate(model: torch.nn.Module) -> list[torch.Tensor]:
    """Replaces ``model.generate`` by a spy that keeps each call's sequences."""
    calls, generate = [], model.generate

    def spy(*args, **kwargs):
        output = generate(*args, **kwargs)
        calls.append(getattr(output, "sequences", output))  # TRL asks for return_dict_in_generate
        return output

    model.generate = spy
    return calls


def training_batches(student: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """The inputs of each training forward of the student (generation runs it in eval mode)."""
    seen = []
    student.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask",
                                                                                    "labels")})
        if module.training else None, with_kwargs=True)
    return seen


def logged(trainer, name: str = "distill/lm_kd") -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


# --- the batch surgery (pure torch) --------------------------------------------------------------------------


def test_prompts_are_found_as_trls_collators_mark_them():
    ids = torch.tensor([[1, 5, 6, 7, 8, 0], [0, 0, 1, 5, 6, 7]])
    real = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 6, 7, 8, -100], [-100, -100, -100, -100, 6, 7]])  # right / left padded
    for batch in ({"input_ids": ids, "attention_mask": real, "labels": labels},
                  {"input_ids": ids, "attention_mask": real, "completion_mask": (labels != -100).long()},
                  {"input_ids": ids, "prompts": torch.tensor([[1, 5], [1, 5]]),
                   "prompt_attention_mask": torch.ones(2, 2, dtype=torch.long)}):
        assert [p.tolist() for p in kdhooks.OnPolicy.prompts(batch)] == [[1, 5], [1, 5]]
    with pytest.raises(kdhooks.ConfigError, match="row 0 of the batch has no prompt") as error:
        kdhooks.OnPolicy.prompts({"input_ids": ids, "attention_mask": real, "labels": ids})
    assert "-100 on the prompt tokens" in error.value.fix
    with pytest.raises(kdhooks.ConfigError, match="padding-free") as error:
        kdhooks.OnPolicy.prompts({"input_ids": ids[:1], "labels": labels[:1], "cu_seq_lens_q": torch.tensor([0, 6])})
    assert "padding_free: false" in error.value.fix


def test_generated_sequences_become_a_batch_with_the_prompt_and_what_follows_eos_masked():
    prompt_ids, prompt_mask = kdhooks.OnPolicy.prompt_batch([torch.tensor([1, 5, 6]), torch.tensor([1, 9])], 0)
    assert prompt_ids.tolist() == [[1, 5, 6], [0, 1, 9]] and prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    sequences = torch.cat([prompt_ids, torch.tensor([[7, 2, 0, 0], [10, 11, 12, 13]])], dim=1)  # row 0 stops (EOS 2)
    batch = kdhooks.OnPolicy.training_batch(sequences, prompt_mask, eos_token_ids=[2], pad_token_id=0)
    # flushed left: each sequence starts at position 0, as when it was generated
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 9, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2, -100], [-100, -100, 10, 11, 12, 13]]


def test_the_draw_is_per_step_and_micro_batch_and_reproducible():
    options = kdhooks.OnPolicy(lmbda=0.5, seq_kd=True)
    draws = [options.source(0, step, micro) for step in range(200) for micro in range(2)]
    assert draws == [options.source(0, step, micro) for step in range(200) for micro in range(2)]
    assert set(draws) == {"student", "teacher"} and 0.4 < draws.count("student") / len(draws) < 0.6
    assert {kdhooks.OnPolicy(lmbda=0.0).source(0, s, 0) for s in range(50)} == {None}
    assert {kdhooks.OnPolicy(lmbda=1.0).source(0, s, 0) for s in range(50)} == {"student"}


# --- config errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_policy, location, fix", [({"lmbdaa": 0.5}, "on_policy.lmbdaa", "'lmbda'"),
                                                      ({"lmbda": 1.5}, "on_policy.lmbda", "less than or equal to 1"),
                                                      ({"top_p": 0}, "on_policy.top_p", "greater than 0")])
def test_a_bad_on_policy_option_is_a_config_error_naming_it(on_policy, location, fix):
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(tiny_llama(1, 16, seed=2), tiny_llama(2, 32, seed=1), {"on_policy": on_policy,
                                                                                 "terms": [GKD]})
    assert error.value.location == location and fix in error.value.fix


def test_a_dataset_without_prompts_fails_at_construction_and_releases_the_student(tmp_path):
    student = tiny_llama(1, 16, seed=2)
    whole = [{**item, "labels": torch.where(item["attention_mask"].bool(), item["input_ids"], -100)}
             for item in lm_data(8, seed=1)]  # every token trained: nothing to continue from
    with pytest.raises(kdhooks.ConfigError, match="has no prompt") as error:
        DistillationTrainer(model=student, teacher=tiny_llama(2, 32, seed=1), kd_config=config(lmbda=0.5),
                            train_dataset=whole, args=training_args(tmp_path, max_steps=1))
    assert error.value.location == "on_policy" and "completion" in error.value.fix
    trainer_for(student, tiny_llama(2, 32, seed=1), config(lmbda=0.5), tmp_path).distiller.close()


# --- in a real Trainer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lmbda, seq_kd, accumulation", [(0.0, False, 1), (1.0, False, 1), (0.5, False, 1),
                                                         (0.5, True, 2)])
def test_generation_happens_at_the_configured_rate(tmp_path, lmbda, seq_kd, accumulation):
    teacher, student = tiny_llama(2, 32, seed=1), tiny_llama(1, 16, seed=2)
    trainer = trainer_for(student, teacher, config(lmbda=lmbda, seq_kd=seq_kd, max_new_tokens=2), tmp_path,
                          steps=12, gradient_accumulation_steps=accumulation, per_device_train_batch_size=2)
    by_student, by_teacher = count_generate(student), count_generate(teacher)
    trainer.train()
    draws = [kdhooks.OnPolicy(lmbda=lmbda, seq_kd=seq_kd).source(0, step, micro)  # args.seed = 0
             for step in range(12) for micro in range(accumulation)]
    assert len(by_student) == draws.count("student") and len(by_teacher) == draws.count("teacher")
    assert trainer.on_policy.generated == {"student": len(by_student), "teacher": len(by_teacher)}
    if lmbda == 0.5:
        assert 0 < len(by_student) < len(draws)
    assert len(logged(trainer)) == 12


def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path):
    teacher, student = sharp_teacher(), tiny_llama(1, 16, seed=2)
    before = copy.deepcopy(student)  # the weights of the first step's loss
    trainer = trainer_for(student, teacher, config(lmbda=1.0, max_new_tokens=6), tmp_path, steps=1)
    generated, batches = count_generate(student), training_batches(student)
    trainer.train()

    batch, data = batches[0], lm_data(4, seed=1)
    assert len(generated) == 1 and len(batches) == 1
    for row, item in zip(batch["input_ids"], data):  # each row continues its data row's prompt
        assert torch.equal(row[:PROMPT], item["input_ids"][:PROMPT])
    assert (batch["labels"][:, :PROMPT] == -100).all()
    continuation = batch["attention_mask"].bool() & (torch.arange(batch["labels"].shape[1]) >= PROMPT)
    assert torch.equal(batch["labels"][continuation], batch["input_ids"][continuation])
    assert (batch["labels"][~continuation] == -100).all()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logits, teacher_logits = before(**inputs).logits, teacher(**inputs).logits
    expected = full_tensor_divergence(student_logits, teacher_logits, batch["labels"], batch["attention_mask"],
                                      "jsd", 0.3, 1.0)
    assert logged(trainer)[0] == pytest.approx(expected, rel=1e-5)
    with_prompt = full_tensor_divergence(student_logits, teacher_logits, batch["input_ids"],
                                         batch["attention_mask"], "jsd", 0.3, 1.0)
    assert abs(with_prompt - expected) > 1e-3 * expected  # the mask matters: the prompt's targets are left out


def test_seq_kd_trains_on_the_teachers_sequences_and_its_generation_records_nothing(tmp_path):
    teacher, student = sharp_teacher(), tiny_llama(1, 16, seed=2)
    before = copy.deepcopy(student)
    trainer = trainer_for(student, teacher, config(lmbda=0.0, seq_kd=True, max_new_tokens=6), tmp_path, steps=1)
    by_student, by_teacher, batches = count_generate(student), count_generate(teacher), training_batches(student)
    trainer.train()

    assert not by_student and len(by_teacher) == 1 and len(batches) == 1
    batch = batches[0]
    prompt_mask = torch.ones(4, PROMPT, dtype=torch.long)  # lm_data's prompts are all PROMPT long
    expected_ids = kdhooks.OnPolicy.training_batch(by_teacher[0], prompt_mask, 2, 0)["input_ids"]
    assert torch.equal(batch["input_ids"], expected_ids)
    with torch.no_grad():  # the teacher's captures are from its forward on this batch, not from its generation
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        expected = full_tensor_divergence(before(**inputs).logits, teacher(**inputs).logits, batch["labels"],
                                          batch["attention_mask"], "jsd", 0.3, 1.0)
    assert logged(trainer)[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_under_gradient_checkpointing_samples_the_same_sequences(tmp_path, family):
    results = []
    for checkpointing in (False, True):
        teacher, student = tiny_llama(2, 32, seed=1), (tiny_llama(1, 16, seed=2) if family == "llama"
                                                       else tiny_gpt2(1, 16, seed=2))
        trainer = trainer_for(student, teacher, config(lmbda=1.0, max_new_tokens=8), tmp_path / str(checkpointing),
                              steps=2, gradient_checkpointing=checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False})
        generated = count_generate(student)
        trainer.train()
        assert student.is_gradient_checkpointing == checkpointing  # restored after each generation
        results.append((generated, logged(trainer)))
    (plain, plain_loss), (checkpointed, checkpointed_loss) = results
    assert len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-5)


def test_one_step_is_trls_gkd_trainer_step_on_the_same_sampled_sequences(tmp_path):
    """lmbda 1: both trainers sample from the same seed with the same options, then take one training step."""
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    datasets = pytest.importorskip("datasets")
    from test_hf_trl import word_tokenizer

    items = lm_data(8, seed=1)

    def batch() -> dict[str, torch.Tensor]:  # with the prompt columns of TRL's ChatML collator
        stacked = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        return {**stacked, "prompts": stacked["input_ids"][:, :PROMPT],
                "prompt_attention_mask": torch.ones(len(items), PROMPT, dtype=torch.long)}

    steps = {}
    for name in ("trl", "kdhooks"):
        teacher, student = sharp_teacher(), tiny_llama(1, 16, seed=2)
        if name == "trl":
            args = trl_gkd.GKDConfig(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], seed=0, lmbda=1.0,
                                     beta=0.3, temperature=0.9, max_new_tokens=8, max_length=LENGTH, bf16=False,
                                     gradient_checkpointing=False, per_device_train_batch_size=8)
            trainer = trl_gkd.GKDTrainer(model=student, teacher_model=teacher, args=args,
                                         train_dataset=datasets.Dataset.from_list([{"messages": []}]),
                                         processing_class=word_tokenizer())
        else:
            kd_config = {"task_weight": 0.0, "on_policy": {"lmbda": 1.0, "temperature": 0.9, "max_new_tokens": 8},
                         "terms": [GKD]}
            trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=kd_config, train_dataset=items,
                                          args=training_args(tmp_path / name, per_device_train_batch_size=8),
                                          processing_class=word_tokenizer())
        generated = count_generate(student)
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is called alone here
        torch.manual_seed(5)
        loss = trainer.training_step(trainer.model, batch(), None)
        steps[name] = (generated[0], float(loss), [p.grad.clone() for p in student.parameters()])
    assert torch.equal(steps["kdhooks"][0], steps["trl"][0])  # the same sampled sequences
    assert steps["kdhooks"][1] == pytest.approx(steps["trl"][1], rel=1e-5)
    for mine, theirs in zip(steps["kdhooks"][2], steps["trl"][2]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()) + 1e-12)


def test_a_lora_student_under_sft_trainer_distills_on_policy(tmp_path):
    """SFTTrainer (gradient checkpointing on by default) with peft_config, a prompt-completion dataset."""
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_hf_trl import word_tokenizer

    items = lm_data(32, seed=1)
    dataset = datasets.Dataset.from_list([
        {"input_ids": item["input_ids"][item["attention_mask"].bool()].tolist(),
         "completion_mask": [0] * PROMPT + [1] * (int(item["attention_mask"].sum()) - PROMPT)} for item in items])
    kd_config = {"task_weight": 0.5, "on_policy": {"lmbda": 0.5, "max_new_tokens": 6},
                 "terms": [{**GKD, "student_head": "lm_head", "student_hidden": "model"}]}
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, seed=0, max_steps=6,
                         logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                         max_length=LENGTH, completion_only_loss=True, bf16=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = with_distillation(trl.SFTTrainer)(model=tiny_llama(1, 16, seed=2), teacher=sharp_teacher(),
                                               kd_config=kd_config, args=args, train_dataset=dataset,
                                               processing_class=word_tokenizer(), peft_config=lora)
    student = trainer.model
    assert type(student).__name__.startswith("Peft") and args.gradient_checkpointing
    generated = count_generate(student)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer.train()

    draws = [kdhooks.OnPolicy(lmbda=0.5).source(0, step, 0) for step in range(6)]
    assert len(generated) == draws.count("student") > 0
    after = dict(student.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert changed and all("lora_" in name for name in changed)  # the adapter trains, the frozen base does not
    assert {name for name in before if "lora_" in name} == changed
    assert len(logged(trainer)) == 6 and all(v > 0 for v in logged(trainer))


def test_a_kept_batch_loses_the_prompt_columns_that_only_generation_reads(tmp_path):
    """TRL's ChatML collator adds `prompts`; the models' forward of a batch that is not generated never sees them."""
    trainer = trainer_for(tiny_llama(1, 16, seed=2), tiny_llama(2, 32, seed=1), config(lmbda=0.0), tmp_path)
    items = lm_data(4, seed=1)
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    batch.update(prompts=batch["input_ids"][:, :PROMPT], prompt_attention_mask=torch.ones(4, PROMPT, dtype=torch.long))
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is called alone here
    assert torch.isfinite(trainer.training_step(trainer.model, batch, None))
    trainer.distiller.close()
