"""FlashModel's public surface: logits, generate (text/ids in, text/stream out), sampling, chat."""

from __future__ import annotations

import pytest
import torch

import llmflash
from llmflash.generation import IncrementalDecoder, render_chat, sample


@pytest.fixture(scope="module")
def model(hf_llama, convert_to):
    return llmflash.FlashModel.open(convert_to(hf_llama.path))


def test_logits_shape_and_dtype(model):
    out = model.logits([1, 5, 9, 13])
    assert out.shape == (4, model.config.vocab_size) and out.dtype == torch.float32
    assert torch.equal(model.logits(torch.tensor([1, 5, 9, 13])), out)


def test_generate_text_ids_and_stream_agree(model):
    text = model.generate("t1 t2 t3", max_new_tokens=6)
    ids = list(model.generate_ids(model.encode("t1 t2 t3"), max_new_tokens=6))
    assert text == model.decode(ids)
    assert "".join(model.generate("t1 t2 t3", max_new_tokens=6, stream=True)) == text
    assert model.generate(model.encode("t1 t2 t3"), max_new_tokens=6) == text


def test_greedy_is_argmax_of_logits(model):
    prompt = model.encode("t4 t8 t15")
    ids = list(model.generate_ids(prompt, max_new_tokens=3, stop_at_eos=False))
    seq = list(prompt)
    for tok in ids:
        assert tok == int(model.logits(seq)[-1].argmax())
        seq.append(tok)


def test_sampling_is_seeded(model):
    a = model.generate("t1 t2", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    b = model.generate("t1 t2", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    assert a == b


def test_stops_at_eos(model):
    eos = model.config.eos_token_ids[0]
    gen = torch.Generator().manual_seed(0)
    assert sample(torch.tensor([0.0, 5.0, 1.0]), 0.0, 1.0, gen) == 1
    # generation stops at EOS without yielding it
    ids = list(model.generate_ids([1, 2, 3], max_new_tokens=50))
    assert eos not in ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -10.0, -10.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 0.5, gen) for _ in range(50)}
    assert picks == {0}


def test_chat_template_renders(model):
    ids = model.chat_prompt("t5 t6")
    assert model.decode(ids) == "t5 t6"  # the fixture's template joins contents
    assert render_chat(None, [{"role": "user", "content": "hi"}]).endswith("assistant:")
    with pytest.raises(ValueError, match="chat template: nope"):
        render_chat("{{ raise_exception('nope') }}", [])


def test_incremental_decoder_holds_partial_characters():
    class ByteTok:  # one token per UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    dec = IncrementalDecoder(ByteTok())
    pieces = [dec.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="out of range"):
        model.logits([model.config.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        model.generate([], max_new_tokens=2)


def test_unknown_strategy(hf_llama, convert_to):
    with pytest.raises(ValueError, match="unknown strategy 'turbo'"):
        llmflash.FlashModel.open(convert_to(hf_llama.path), strategy="turbo")
