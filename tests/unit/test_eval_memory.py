"""Issue 33 on the CPU: logits made a chunk of positions at a time give the one-pass results (bit for bit while a
pass fits one chunk), the export's chunked logits check gives the whole-tensor numbers, and the plan refuses, in one
line, a GPU that cannot hold export or eval of the real model."""

from __future__ import annotations

import pytest

from nano3.config import load_params
from nano3.errors import UserError
from nano3.export.footprint import check_fits, footprints
from nano3.model.hf import nemotron_h_config
from nano3.model.logits import answer_logits, position_losses, summed_loss
from nano3.model.presets import PRESETS
from tests.conftest import ROOT

VOCAB = 512


@pytest.fixture(scope="module")
def tiny():
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = nemotron_h_config(PRESETS["tiny"], vocab_size=VOCAB, eod_id=2, max_positions=512, dtype="float32")
    return AutoModelForCausalLM.from_config(config).eval()


def windows(batch: int, length: int):
    import torch

    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def test_losses_in_one_chunk_are_the_one_pass_losses_bit_for_bit(tiny):
    import torch
    import torch.nn.functional as F

    ids = windows(2, 65)
    with torch.no_grad():
        logits = tiny(input_ids=ids[:, :-1]).logits.float()
    whole = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum").item()
    assert summed_loss(tiny, ids, chunk_tokens=128) == whole
    with torch.no_grad():  # one window, as loss by position and pass-key prompts run
        one = tiny(input_ids=ids[:1, :-1]).logits.float()
    first = F.cross_entropy(one[0], ids[0, 1:], reduction="none").numpy()
    assert (position_losses(tiny, ids[:1], chunk_tokens=64) == first).all()
    assert torch.equal(answer_logits(tiny, ids[:1, :-1], 3, chunk_tokens=64), one[0, -3:])


def test_losses_in_many_chunks_equal_the_one_pass_losses(tiny):
    ids = windows(2, 65)
    one = summed_loss(tiny, ids, chunk_tokens=128)
    assert summed_loss(tiny, ids, chunk_tokens=10) == pytest.approx(one, rel=1e-6)
    assert position_losses(tiny, ids[:1], chunk_tokens=7) == pytest.approx(position_losses(tiny, ids[:1], 64), rel=1e-5)
    import torch

    assert torch.allclose(answer_logits(tiny, ids[:1, :-1], 3, chunk_tokens=5),
                          answer_logits(tiny, ids[:1, :-1], 3, chunk_tokens=64), rtol=1e-5, atol=1e-5)


def test_the_chunked_logits_check_gives_the_whole_tensor_numbers(tiny, tmp_path, monkeypatch):
    import torch

    from nano3.export.megatron import LogitsDifference, compare_logits

    monkeypatch.setattr(LogitsDifference, "ROWS", 7)  # float64 sums a few rows at a time, across chunks of 9

    tiny.to(torch.bfloat16).save_pretrained(tmp_path)
    tiny.float()
    ids = windows(1, 40)
    with torch.no_grad():
        theirs = torch.nn.Module.__call__(type(tiny).from_pretrained(tmp_path, dtype=torch.bfloat16).eval(),
                                          input_ids=ids).logits.float()
    same = compare_logits(theirs.clone(), ids, tmp_path, chunk_tokens=9, device_map="cpu")
    assert same["tokens"] == 40 and same["rel_l2"] == 0 and same["max_abs_diff"] == 0 and same["top1_agreement"] == 1
    ours = theirs + torch.randn(theirs.shape, generator=torch.Generator().manual_seed(2)) * 0.1
    got = compare_logits(ours, ids, tmp_path, chunk_tokens=9, device_map="cpu")
    diff = ours - theirs
    assert got["rel_l2"] == pytest.approx(float(diff.norm() / ours.norm()), rel=1e-5)
    assert got["max_abs_diff"] == pytest.approx(float(diff.abs().max()), rel=1e-6)
    assert got["mean_abs_diff"] == pytest.approx(float(diff.abs().mean()), rel=1e-5)
    assert got["top1_agreement"] == pytest.approx(float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()))


def test_moe_layers_in_token_chunks_give_the_one_pass_output(tiny):
    import torch

    from nano3.model.hf import chunk_moe_tokens, moe_layers

    ids = windows(2, 50)
    with torch.no_grad():
        whole = tiny(input_ids=ids).logits
    moe = moe_layers(tiny)
    passes = []
    for layer in moe:  # count the passes beneath the chunking
        layer.forward = lambda hidden, forward=layer.forward: (passes.append(hidden.shape[1]), forward(hidden))[1]
    chunk_moe_tokens(tiny, tokens=32)  # 16 positions of the 2 windows per pass
    with torch.no_grad():
        chunked = tiny(input_ids=ids).logits
    for layer in moe:
        del layer.forward  # the fixture's model, as it was
    assert passes == [16, 16, 16, 2] * len(moe)
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-5)


def test_the_plan_refuses_a_gpu_too_small_for_export_or_eval_of_the_real_model():
    params = load_params(str(ROOT / "configs" / "nano3.yaml"))
    sizes = footprints(params, 131072)
    for stage, footprint in sizes.items():
        assert 58 < footprint.weights_gib < 60  # 31.6B parameters in BF16
        check_fits(footprint, 79.6, "an H100 80GB")  # fits, with the recipe's lengths
        with pytest.raises(UserError, match=f"^{stage}: the plan estimates .* GiB on one GPU .* but cluster 'x' has 40.0"):
            check_fits(footprint, 40.0, "cluster 'x'")
    longer = load_params(str(ROOT / "configs" / "nano3.yaml"), ["eval.long_context.lengths=[4096,1048576]"])
    assert footprints(longer, 131072)["eval"].gpu_gib > sizes["eval"].gpu_gib  # a 1M-token forward costs more
