"""Tiny HF models from configs and generated token data for the HF tests (no downloads)."""
from __future__ import annotations

import torch
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration, TrainingArguments)

VOCAB = 40
LENGTH = 16
PAD, CLS = 0, 1
POSITIVE = range(3, 9)
NEGATIVE = range(9, 15)
NEUTRAL = range(15, VOCAB)


def tiny_bert(layers: int, hidden: int, heads: int = 2, attn: str = "eager", seed: int = 0,
              dropout: float = 0.0, attention_dropout: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=LENGTH, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout,
                        attn_implementation=attn)
    return BertForSequenceClassification(config)


def tiny_llama(layers: int, hidden: int, heads: int = 2, seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=LENGTH,
                         tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=CLS, eos_token_id=2)
    return LlamaForCausalLM(config)


def tiny_gpt2(layers: int, hidden: int, heads: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=LENGTH,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=CLS,
                        eos_token_id=2)
    return GPT2LMHeadModel(config)


def tiny_t5(layers: int, hidden: int, heads: int = 2, seed: int = 0, attn: str = "eager",
            decoder_layers: int | None = None) -> T5ForConditionalGeneration:
    """A T5 without dropout; its decoder starts from the pad token, as T5's does."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=layers,
                      num_decoder_layers=decoder_layers or layers, num_heads=heads, dropout_rate=0.0,
                      relative_attention_num_buckets=8, pad_token_id=PAD, eos_token_id=2, decoder_start_token_id=PAD,
                      attn_implementation=attn)
    return T5ForConditionalGeneration(config)


def tiny_bart(layers: int, hidden: int, heads: int = 2, seed: int = 0, attn: str = "eager",
              decoder_layers: int | None = None) -> BartForConditionalGeneration:
    """A BART without dropout; its decoder starts from EOS (2), as BART's does."""
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=VOCAB, d_model=hidden, encoder_layers=layers,
                        decoder_layers=decoder_layers or layers, encoder_attention_heads=heads,
                        decoder_attention_heads=heads, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
                        max_position_embeddings=2 * LENGTH, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0, pad_token_id=PAD, bos_token_id=CLS, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None, attn_implementation=attn)
    return BartForConditionalGeneration(config)


def seq2seq_data(n: int, seed: int, target_length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Reverse a counting sequence: source (LENGTH tokens, right-padded) → its tokens reversed and then EOS
    (``target_length`` tokens, label -100 past the end). Source and target lengths differ unless
    ``target_length == LENGTH``."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(4, min(LENGTH, target_length - 1) + 1, (), generator=g))
        start, step = int(torch.randint(3, VOCAB, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        tokens = [3 + (start + step * i) % (VOCAB - 3) for i in range(length)]
        ids = torch.full((LENGTH,), PAD)
        ids[:length] = torch.tensor(tokens)
        labels = torch.full((target_length,), -100)
        labels[:length + 1] = torch.tensor([*reversed(tokens), 2])
        items.append({"input_ids": ids, "attention_mask": (torch.arange(LENGTH) < length).long(), "labels": labels})
    return items


def sentiment_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences of sentiment and neutral words, padded; the label says whether positive words outnumber negative."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(6, LENGTH, (), generator=g))
        sentiment = 2 * int(torch.randint(1, 4, (), generator=g)) - 1  # an odd count: no ties
        positive = int(torch.randint(0, sentiment + 1, (), generator=g))
        words = ([POSITIVE[int(i)] for i in torch.randint(0, len(POSITIVE), (positive,), generator=g)]
                 + [NEGATIVE[int(i)] for i in torch.randint(0, len(NEGATIVE), (sentiment - positive,), generator=g)]
                 + [NEUTRAL[int(i)] for i in torch.randint(0, len(NEUTRAL), (length - 1 - sentiment,), generator=g)])
        words = [words[int(i)] for i in torch.randperm(len(words), generator=g)]
        ids = torch.full((LENGTH,), PAD)
        ids[: len(words) + 1] = torch.tensor([CLS, *words])
        mask = (torch.arange(LENGTH) <= len(words)).long()
        items.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(int(2 * positive > sentiment))})
    return items


def lm_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (start, start+step, ...) mod the vocabulary, right-padded; prompt and padding are -100."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(8, LENGTH + 1, (), generator=g))
        start, step = int(torch.randint(3, VOCAB, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        tokens = [CLS] + [3 + (start + step * i) % (VOCAB - 3) for i in range(length - 1)]
        ids = torch.full((LENGTH,), PAD)
        ids[:length] = torch.tensor(tokens)
        mask = (torch.arange(LENGTH) < length).long()
        labels = torch.where(mask.bool(), ids, torch.tensor(-100))
        labels[:3] = -100  # the prompt: start token and the first two numbers
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return items


def full_tensor_divergence(student_logits, teacher_logits, labels, attention_mask, divergence, beta,
                           temperature, top_k=None):
    """Shift, mask, softmax over the whole (B, L, V) tensors in float64; then mean over kept tokens · T²."""
    s = student_logits[:, :-1].double() / temperature
    t = teacher_logits[:, :-1].double() / temperature
    keep = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    p, q = t.softmax(-1), s.softmax(-1)
    if top_k is not None:
        top = t.topk(top_k, dim=-1).indices
        p_top, q_top = p.gather(-1, top), q.gather(-1, top)
        p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    if divergence == "forward_kl":
        per_token = (p * (p.log() - q.log())).sum(-1)
    elif divergence == "reverse_kl":
        per_token = (q * (q.log() - p.log())).sum(-1)
    elif divergence == "jsd":
        m = beta * p + (1 - beta) * q
        per_token = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    else:
        per_token = 0.5 * (p - q).abs().sum(-1)
    return float(per_token[keep].mean() * temperature**2)


def training_args(output_dir, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                   per_device_train_batch_size=32, learning_rate=3e-3, logging_steps=5, save_strategy="no",
                   dataloader_num_workers=0, lr_scheduler_type="constant")
    options.update(overrides)
    return TrainingArguments(**options)


def accuracy(model: torch.nn.Module, items: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "attention_mask")}
        predictions = model(**batch).logits.argmax(-1)
    labels = torch.stack([item["labels"] for item in items])
    return float((predictions == labels).float().mean())
