"""Tokenizing prompts and encoding them into the conditioning the UNet sees (docs/METHOD.md B1).

Shared by inference, training and the benchmark, so that every script reads a prompt the same way; the text
length "words" mask lives here once.
"""
import torch


def leading_specials(tokenizer):
    """How many special tokens come before a text's words: 1 (CLIP's BOS) or 0 (T5 has no BOS)."""
    return len(tokenizer("").input_ids) - 1  # the empty text is those and EOS


def specials_note(tokenizer):
    """How a token count is meant, for messages: with CLIP's BOS and EOS, or T5's EOS (it has no BOS)."""
    return "BOS and EOS included" if leading_specials(tokenizer) else "EOS included"


def token_ids(tokenizer, text, length=None):
    """Ids of `text` with BOS (where the tokenizer has one) and EOS; padded (with the tokenizer's pad id) or cut to `length` if given."""
    if length is None:
        return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return tokenizer(text, padding="max_length", truncation=True, max_length=length).input_ids


def token_count(tokenizer, text):
    """How many tokens `text` has with BOS and EOS, however many that is (token_ids cuts at the maximum)."""
    return len(tokenizer(text, verbose=False).input_ids)


def words_mask(num_visible, length):
    """The attention mask of text length "words" [length]: 1 for the first num_visible rows (BOS and the words),
    0 for EOS and padding, which the UNet of a model trained that way never sees."""
    return [1] * num_visible + [0] * (length - num_visible)


def word_ids(tokenizer, text):
    """Ids of the words of `text`, without BOS and EOS."""
    return token_ids(tokenizer, text)[leading_specials(tokenizer):-1]


def token_texts(tokenizer, ids):
    """Readable tokens ('dog' for CLIP's 'dog</w>' and T5's '▁dog')."""
    return [t.replace("</w>", "").replace("\u2581", "") or t for t in tokenizer.convert_ids_to_tokens(list(ids))]


@torch.no_grad()
def encode_ids(text_encoder, ids):
    """The text conditioning: ids [B, L] -> [B, L, d], float32 (SD: the last hidden states; SDXL: both
    encoders' penultimate states side by side)."""
    return encode_text(text_encoder, ids)[0]


def conditioning(sd, prompt_ids, uncond_ids, negative_is_empty, prompt=None, negative=None):
    """(cond [L, d], uncond [L, d], pooled) float32 for the sampler, as the model's own pipeline builds them.

    pooled: SDXL's pooled embeddings (cond [p], uncond [p]); None for SD. Where SDXL's pipeline asks for it
    (force_zeros_for_empty_prompt), an empty negative prompt is zeros, states and pooled, not the encoding of "".
    FLUX (prompt: the text, for CLIP's pooled embedding): (T5 states, None, (CLIP pooled, None)): no
    unconditional branch, unless negative (the negative prompt's text, for true_cfg_scale) is given: then its
    states (of uncond_ids) and pooled embedding in place of the Nones.
    """
    if sd.family == "flux":
        from flux import flux_conditioning
        states, pooled = flux_conditioning(sd, prompt_ids, prompt)
        if negative is None:
            return states, None, (pooled, None)
        uncond, uncond_pooled = flux_conditioning(sd, uncond_ids, negative)
        return states, uncond, (pooled, uncond_pooled)
    states, pooled = encode_text(sd.text_encoder, [prompt_ids, uncond_ids])  # [2, L, d], [2, p]
    if sd.family != "sdxl":
        return states[0], states[1], None
    if sd.zero_empty_negative and negative_is_empty:
        return states[0], torch.zeros_like(states[1]), (pooled[0], torch.zeros_like(pooled[1]))
    return states[0], states[1], (pooled[0], pooled[1])


@torch.no_grad()
def encode_text(text_encoder, ids):
    """(states [B, L, d], pooled [B, p]) float32 of ids [B, L] or [L]."""
    ids = torch.as_tensor(ids, device=text_encoder.device)
    if ids.ndim == 1:
        ids = ids[None]
    out = text_encoder(ids)
    return out[0].float(), None if out[1] is None else out[1].float()


def unigram_t5_tokenizer(lines, max_length=512):
    """A SentencePiece-style Unigram tokenizer laid out as T5's, for a small vocabulary (the toy FLUX's, the tests'):
    "<pad>" 0, "</s>" 1, "<unk>" 2, then the pieces by descending score; words split on whitespace with "▁" before
    each, "</s>" appended. Each word of `lines` (split from punctuation) is one piece scored by its log frequency;
    "▁" and single characters, scored below every word, spell the rest, and a character outside them is "<unk>"."""
    import math
    import re
    import string
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    counts = Counter()
    for line in lines:
        for word in line.split():
            counts.update(re.findall(r"▁?\w+|▁?[^\w▁]", "▁" + word))
    total = sum(counts.values())
    words = sorted(counts, key=lambda piece: (-counts[piece], piece))
    lowest = math.log(counts[words[-1]] / total)
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation) - set(words))
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, math.log(counts[w] / total)) for w in words]
              + [("▁", lowest - 1.0)] + [(c, lowest - 2.0) for c in characters])
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    # the pre-tokenizer and decoder transformers' T5 tokenizer rebuilds when it loads the file: no other normalizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)
