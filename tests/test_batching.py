"""Training batches: length-grouped epochs are seeded permutations, the sampler resumes mid-epoch on the same batches,
packing keeps every row's loss, and the padding figure matches the batches' own padding."""

from __future__ import annotations

import random

import pytest
import torch

from wct.data.batching import (
    StreamSampler,
    collate,
    collate_packed,
    epoch_order,
    pack,
    padding_fraction,
    real_tokens,
)
from wct.data.instruct import IGNORE_INDEX
from wct.models import load_model

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(5, 120) for _ in range(103)]


def batches(sampler: StreamSampler) -> list[list[int]]:
    return list(sampler)


@pytest.mark.parametrize("chunk", [0, 8, 40, 1000])
def test_grouped_epoch_is_a_seeded_permutation(chunk):
    order = epoch_order(len(LENGTHS), 3, 0, LENGTHS, chunk)
    assert sorted(order) == list(range(len(LENGTHS)))
    assert order == epoch_order(len(LENGTHS), 3, 0, LENGTHS, chunk)
    assert order != epoch_order(len(LENGTHS), 4, 0, LENGTHS, chunk)
    assert order != epoch_order(len(LENGTHS), 3, 1, LENGTHS, chunk)
    if chunk:
        for c in range(0, len(order), chunk):
            got = [LENGTHS[i] for i in order[c : c + chunk]]
            assert got == sorted(got, reverse=True)
            assert set(order[c : c + chunk]) == set(epoch_order(len(LENGTHS), 3, 0)[c : c + chunk])


@pytest.mark.parametrize("group, capacity", [(0, 0), (5, 0), (5, 160), (0, 160)])
def test_sampler_resumes_mid_epoch_on_the_same_batches(group, capacity):
    def sampler(position=0, rank=0, world=1):
        return StreamSampler(len(LENGTHS), 4, 70, lambda: position, seed=1, rank=rank, world=world, lengths=LENGTHS,
                             group=group, capacity=capacity)

    straight = batches(sampler())
    assert len(straight) == 70 and batches(sampler()) == straight
    assert batches(sampler(position=33)) == straight[33:]  # 70 x 4 rows: mid-epoch, across epochs
    if capacity:
        for b in straight:  # each batch fills at most 4 sequences of <= capacity tokens
            seqs = pack([LENGTHS[i] for i in b], capacity)
            assert len(seqs) <= 4 and all(sum(LENGTHS[b[i]] for i in s) <= capacity for s in seqs)
    flat = [i for b in straight for i in b]
    assert sorted(flat[: len(LENGTHS)]) == list(range(len(LENGTHS)))  # the first epoch: every row once
    two = [batches(sampler(rank=r, world=2)) for r in range(2)]
    for a, b in list(zip(*two))[:3]:  # within the first epoch, ranks share no row of a global micro-batch
        assert not set(a) & set(b) and (capacity or len(a) == len(b) == 4)
    assert batches(sampler(position=10, rank=1, world=2)) == two[1][10:]


def test_grouping_reduces_padding():
    def frac(group):
        return padding_fraction(StreamSampler(len(LENGTHS), 4, 50, seed=0, lengths=LENGTHS, group=group), LENGTHS)

    assert frac(10) < frac(0) / 2
    packed = StreamSampler(len(LENGTHS), 2, 50, seed=0, lengths=LENGTHS, capacity=256)
    assert padding_fraction(packed, LENGTHS) < frac(0)


def rows(n_rows: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_rows):
        n = 7 + 5 * k
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        prompt = 3 + k
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_padding_fraction_counts_the_collated_batches():
    data = rows(6)
    lengths = [len(r["input_ids"]) for r in data]
    for capacity in (0, 40):
        sampler = StreamSampler(len(data), 2, 9, seed=0, lengths=lengths, capacity=capacity)
        real = positions = 0
        for b in sampler:
            batch = [data[i] for i in b]
            out = collate_packed(batch, 258, capacity) if capacity else collate(batch, 258)
            real += real_tokens(out)
            positions += out["input_ids"].numel()
        assert padding_fraction(sampler, lengths) == pytest.approx(1 - real / positions, abs=1e-12)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_have_their_unpacked_loss(attn):
    model, _ = load_model("tiny-llama")
    model.set_attn_implementation(attn)
    model = model.double()
    model.config.use_cache = False  # as in training: with a cache transformers does not look for packed rows
    data = rows(4)
    packed = collate_packed(data, 258, capacity=1000)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
    at = 0
    for r in data:  # every row alone, no padding: the reference
        n = len(r["input_ids"])
        alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
        labels = torch.tensor(r["labels"])
        ref = torch.nn.functional.cross_entropy(alone[:-1], labels[1:], reduction="sum")
        got = torch.nn.functional.cross_entropy(logits[at : at + n - 1], packed["labels"][0, at + 1 : at + n],
                                                reduction="sum")
        assert got.item() == pytest.approx(ref.item(), rel=1e-7)  # float64 model; rotary tables are float32
        at += n
    # the batch loss: the mean over the same trained tokens as the unpacked, padded batch
    unpacked = collate(data, 258)
    loss_unpacked = model(**unpacked).loss
    loss_packed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                        labels=packed["labels"]).loss
    assert loss_packed.item() == pytest.approx(loss_unpacked.item(), rel=1e-7)
    # without the restarting position ids the rows would see each other: the loss changes
    crossed = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    assert abs(crossed.item() - loss_unpacked.item()) > 1e-3
