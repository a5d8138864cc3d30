"""Activation checkpointing under the Trainer, for every NLP term: use_reentrant=False trains as without it;
use_reentrant=True works where the taps are outside the checkpointed blocks and is refused, with the fix, inside."""
from __future__ import annotations

import pytest
import transformers
from _hf import lm_data, tiny_gpt2, tiny_llama, training_args

import kdhooks
from kdhooks.integrations.hf import DistillationTrainer

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
                                        "ignore:attention maps need attention probabilities")

MODELS = {"llama": (tiny_llama, "model"), "gpt2": (tiny_gpt2, "transformer")}
# the term, and whether its taps are inside a checkpointed block (HF checkpoints a block's forward, so the
# block's own input and output hooks stay outside; its attention module is inside)
TERMS = {"lm_kd": ({"kind": "lm_kd", "divergence": "jsd"}, False),
         "lm_kd_head": ({"kind": "lm_kd", "student_head": "lm_head", "student_hidden": "{backbone}"}, False),
         "hidden_states": ({"kind": "hidden_states", "embeddings": True}, False),
         "attention_maps": ({"kind": "attention_maps", "distance": "kl"}, True)}


def first_step(tmp_path, model: str, term: dict, reentrant: bool | None) -> dict[str, float]:
    make, backbone = MODELS[model]
    term = {key: value.format(backbone=backbone) if isinstance(value, str) else value for key, value in term.items()}
    checkpointing = {} if reentrant is None else dict(gradient_checkpointing=True,
                                                      gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = DistillationTrainer(model=make(2, 16, seed=2), teacher=make(2, 32, seed=1), train_dataset=lm_data(8, 0),
                                  kd_config={"terms": [{**term, "weight": 10.0}]},
                                  args=training_args(tmp_path, max_steps=1, per_device_train_batch_size=8,
                                                     logging_steps=1, **checkpointing))
    try:
        trainer.train()
    finally:
        trainer.distiller.close()
        # the Trainer switched checkpointing on in its blocks (in train())
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == bool(checkpointing)
    return trainer.state.log_history[0]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", TERMS)
def test_each_nlp_term_under_activation_checkpointing(tmp_path, model, name):
    term, inside = TERMS[name]
    plain = first_step(tmp_path, model, term, None)
    assert plain[f"distill/{name.removesuffix('_head')}"] > 0
    settings = [False] if inside else [False, True]
    for reentrant in settings:
        checkpointed = first_step(tmp_path, model, term, reentrant)
        for key in ("loss", "grad_norm", f"distill/{name.removesuffix('_head')}"):
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), (reentrant, key)
    if inside:
        with pytest.raises(kdhooks.LossError, match=r"use_reentrant=True") as error:
            first_step(tmp_path, model, term, True)
        assert "'use_reentrant': False" in error.value.fix
