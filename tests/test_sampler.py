import pytest
import torch

from engine import SamplingParams
from engine.layers.sampler import Sampler, SamplingBatch, _top_k_top_p, hashed_uniform


def batch(n, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seeds=None, positions=None):
    t = torch.full((n,), float(temperature))
    seeds = torch.tensor(seeds if seeds is not None else [-1] * n)
    positions = torch.tensor(positions if positions is not None else [0] * n)
    return SamplingBatch(t, torch.full((n,), top_k), torch.full((n,), float(top_p)), torch.full((n,), float(min_p)),
                         seeds, positions, all_greedy=temperature == 0, any_greedy=temperature == 0,
                         use_top_k_top_p=top_k > 0 or top_p < 1,
                         use_min_p=min_p > 0, any_seeded=bool((seeds >= 0).any()))


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(Sampler()(logits, batch(5, temperature=0)), logits.argmax(-1))


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p: torch.isfinite(_top_k_top_p(logits, torch.tensor([k]), torch.tensor([p])))[0].tolist()
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(-1, 0.7) == [True, True, False, False]   # 0.5 < 0.7, 0.5+0.3 reaches it
    assert kept(-1, 0.5) == [True, False, False, False]
    assert kept(3, 0.9) == [True, True, True, False]


def test_samples_stay_inside_masks():
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    top2 = logits.topk(2, dim=-1).indices
    out = Sampler()(logits, batch(64, top_k=2))
    assert all(o in row for o, row in zip(out.tolist(), top2.tolist()))
    probs = torch.softmax(logits, -1)
    out = Sampler()(logits, batch(64, min_p=0.5))
    assert bool((probs.gather(1, out[:, None])[:, 0] >= 0.5 * probs.max(-1).values).all())


def test_sampling_follows_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(20000, 1)
    counts = torch.bincount(Sampler(seed=1)(logits, batch(20000)), minlength=3).float() / 20000
    assert torch.allclose(counts, probs, atol=0.02)


def test_seeded_rows_reproducible_regardless_of_batch():
    logits = torch.randn(4, 300)
    a = Sampler(seed=1)(logits, batch(4, seeds=[7, 7, -1, 8], positions=[3, 3, 0, 3]))
    b = Sampler(seed=2)(logits[[1, 0]], batch(2, seeds=[7, 7], positions=[3, 3]))
    assert a[0] == a[1] == b[0] == b[1]
    u = hashed_uniform(torch.tensor([7, 7]), torch.tensor([3, 4]), 1000)
    assert not torch.equal(u[0], u[1]) and bool(((u > 0) & (u < 1)).all())
    assert abs(float(u.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_k", 0), ("min_p", 2),
                                         ("max_tokens", 0), ("seed", 1.5), ("stop", [""]), ("ignore_eos", "y")])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(6, 40)
    b = batch(6)
    b.temperatures = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    b.all_greedy, b.any_greedy = False, True
    out = Sampler()(logits, b)
    assert out[[0, 2, 4]].tolist() == logits[[0, 2, 4]].argmax(-1).tolist()


def test_hashed_noise_stays_below_one():
    """Seed 20, position 0, token 65631 hashes to the top 24-bit value, where k + 0.5 rounds up to 2**24:
    uncapped, u == 1 gave that token infinite Gumbel noise, so it won even where masked to -inf."""
    u = hashed_uniform(torch.tensor([20]), torch.tensor([0]), 65632)
    assert float(u.max()) < 1.0 and float(u[0, 65631]) > 1 - 2 ** -23
    logits = torch.full((1, 65632), float("-inf"))
    logits[0, :10] = 0.0
    assert int(Sampler()(logits, batch(1, seeds=[20], positions=[0]))) < 10
