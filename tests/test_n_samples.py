"""n completions of one prompt: one result per prompt with a list of n per completion field, the prompt's KV blocks
shared through the prefix cache, each completion with its own seed stream."""
import pytest

from engine import SamplingParams

PROMPT = ("The history of the printing press begins in Mainz around 1440, where Johannes Gutenberg, a goldsmith, "
          "combined movable metal type, oil-based ink and a screw press adapted from those used for wine")


@pytest.fixture(scope="module")
def demo():
    from engine import LLM
    llm = LLM("demo", device="cpu", max_model_len=128, max_num_seqs=8, kvcache_block_size=16)
    yield llm
    llm.shutdown()


def test_n_completions_share_the_prompt_and_are_reproducible(demo):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=5, n=3, logprobs=1, prompt_logprobs=1)
    first, again = (demo.generate([PROMPT], params, use_tqdm=False)[0] for _ in range(2))
    assert first["token_ids"] == again["token_ids"] and len(first["token_ids"]) == 3
    assert len({tuple(t) for t in first["token_ids"]}) > 1  # own seed streams: the completions differ
    assert all(len(t) == len(lp) == 5 for t, lp in zip(first["token_ids"], first["logprobs"]))
    assert isinstance(first["num_prompt_tokens"], int) and first["prompt_logprobs"][0] is None
    alone = demo.generate([PROMPT], SamplingParams(temperature=1.0, seed=11, max_tokens=5), use_tqdm=False)[0]
    assert alone["token_ids"] == first["token_ids"][0]


def test_later_completions_reuse_the_prompt_blocks(demo):
    out = demo.generate([PROMPT + " and", "Hi"], [SamplingParams(temperature=0.8, max_tokens=2, n=3),
                                                  SamplingParams(max_tokens=2)], use_tqdm=False)
    full_blocks = (out[0]["num_prompt_tokens"] - 1) // 16 * 16
    assert out[0]["num_cached_tokens"][1:] == [full_blocks] * 2 and full_blocks > 0
    assert isinstance(out[1]["text"], str)  # n=1 results keep their shape


def test_n_must_be_positive_and_add_request_takes_one_completion(demo):
    with pytest.raises(ValueError, match=r"SamplingParams.n=0 must be an int >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n > 1 needs generate"):
        demo.add_request("hi", SamplingParams(n=2))
