"""Generated data and tiny models from configs for the HF examples: nothing is downloaded."""
from __future__ import annotations

import torch
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

VOCAB, LENGTH = 40, 16
PAD, BOS, EOS = 0, 1, 2
POSITIVE, NEGATIVE, NEUTRAL = range(3, 9), range(9, 15), range(15, VOCAB)


def bert(layers: int, hidden: int, heads: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=LENGTH, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager"))  # attention_maps needs the probabilities, which SDPA does not return


def llama(layers: int, hidden: int, heads: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=LENGTH,
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS))


def bart(layers: int, hidden: int, heads: int, seed: int) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * hidden,
        decoder_ffn_dim=2 * hidden, max_position_embeddings=2 * LENGTH, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
        forced_eos_token_id=None, attn_implementation="eager"))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the vocabulary (`w0` … `w39`), built here: TRL's SFTTrainer wants one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token=f"w{EOS}"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"w{PAD}", bos_token=f"w{BOS}",
                                   eos_token=f"w{EOS}", unk_token=f"w{EOS}", model_max_length=LENGTH)


def sentiment(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """'Sentences' of sentiment and neutral words; label 1 when positive words outnumber negative ones."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda words, k: [words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)]  # noqa: E731
    items = []
    for _ in range(n):
        length = int(torch.randint(6, LENGTH, (), generator=g))
        sentiment_words = 2 * int(torch.randint(1, 4, (), generator=g)) - 1
        positive = int(torch.randint(0, sentiment_words + 1, (), generator=g))
        words = (pick(POSITIVE, positive) + pick(NEGATIVE, sentiment_words - positive)
                 + pick(NEUTRAL, length - 1 - sentiment_words))
        words = [words[int(i)] for i in torch.randperm(len(words), generator=g)]
        ids = torch.full((LENGTH,), PAD)
        ids[: len(words) + 1] = torch.tensor([BOS, *words])
        items.append({"input_ids": ids, "attention_mask": (ids != PAD).long(),
                      "labels": torch.tensor(int(2 * positive > sentiment_words))})
    return items


def counting(n: int, seed: int, skip: float = 0.25) -> list[dict[str, torch.Tensor]]:
    """Arithmetic sequences modulo the vocabulary that skip a term with probability ``skip`` (so the next
    token is uncertain and a teacher's distribution says more than one label); the first three tokens
    are the prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(8, LENGTH + 1, (), generator=g))
        value, step = int(torch.randint(3, VOCAB, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        tokens = [BOS]
        for _ in range(length - 1):
            tokens.append(3 + value % (VOCAB - 3))
            value += step * (2 if float(torch.rand((), generator=g)) < skip else 1)
        ids = torch.full((LENGTH,), PAD)
        ids[:length] = torch.tensor(tokens)
        mask = (torch.arange(LENGTH) < length).long()
        labels = torch.where(mask.bool(), ids, torch.tensor(-100))
        labels[:3] = -100
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return items


def continuation(n: int, seed: int, skip: float = 0.25, source: int = 10, target: int = 6
                 ) -> list[dict[str, torch.Tensor]]:
    """Seq2seq: the first terms of an arithmetic sequence that skips a term with probability ``skip`` → its
    next ``target`` terms and EOS. Sources are 4 to ``source`` tokens, right-padded to LENGTH; targets are
    ``target + 1`` tokens: the lengths differ."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(4, source + 1, (), generator=g))
        value, step = int(torch.randint(3, VOCAB, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        tokens = []
        for _ in range(length + target):
            tokens.append(3 + value % (VOCAB - 3))
            value += step * (2 if float(torch.rand((), generator=g)) < skip else 1)
        ids = torch.full((LENGTH,), PAD)
        ids[:length] = torch.tensor(tokens[:length])
        items.append({"input_ids": ids, "attention_mask": (ids != PAD).long(),
                      "labels": torch.tensor([*tokens[length:], EOS])})
    return items
