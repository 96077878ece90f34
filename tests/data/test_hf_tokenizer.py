"""A checkpoint's own tokenizer directory and chat template (``data.chat_template:
tokenizer``), against transformers' ``apply_chat_template`` on the same directory.

The directory is built here with the ``tokenizers`` library (a word-level vocabulary, the
ChatML special tokens Qwen uses) and saved by ``PreTrainedTokenizerFast`` with a ChatML chat
template; EOS is ``<|endoftext|>``, so ``<|im_end|>`` is a stop token only because it is the
template's end of turn.
"""

from __future__ import annotations

import json

import pytest

from hpc_rlhf.config import SFTDataConfig
from hpc_rlhf.data.prompts import PromptDataset
from hpc_rlhf.data.sft import conversation_tokens
from hpc_rlhf.data.tokenizer import HFTokenizer, load_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + "
    "message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)
WORDS = "system user assistant you are a helpful bot hi hello how the cat sat on mat".split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, "[UNK]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(path))
    return str(path)


def _reference(tokenizer_dir, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    out = tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_directory_loads_with_its_special_and_stop_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(SPECIALS) + 1 + len(WORDS)
    assert tok.eos_id == 0 and tok.pad_id == 0
    assert set(tok.stop_ids) == {0, tok.token_id("<|im_end|>")} and tok.token_id("<|im_end|>") == 2
    assert tok.encode("the cat sat") == [tok.token_id(w) for w in ("the", "cat", "sat")]


def test_prompts_are_the_templates_generation_prompts(tokenizer_dir, tmp_path):
    texts = ["hi how are you", "the cat sat on the mat", "hello bot"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    tok = load_tokenizer(tokenizer_dir)
    data = PromptDataset(str(path), tok, 64, chat_template="tokenizer", shuffle=False)
    for text, ids in zip(texts, data.token_ids):
        want = _reference(tokenizer_dir, [{"role": "user", "content": text}], True)
        assert ids == want
        assert ids[-2:] == [tok.token_id("<|im_start|>"), tok.token_id("assistant")]
    cut = PromptDataset(str(path), tok, 7, chat_template="tokenizer", shuffle=False)
    assert max(len(ids) for ids in cut.token_ids) <= 7
    long_ids = cut.token_ids[1]  # "the cat sat on the mat": kept tail "the mat"
    assert long_ids == _reference(tokenizer_dir, [{"role": "user", "content": "the mat"}], True)
    with pytest.raises(Exception, match="no room for the prompt"):
        PromptDataset(str(path), tok, 4, chat_template="tokenizer", shuffle=False)


def test_sft_loss_is_on_each_assistant_turn_as_the_template_renders_it(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    turns = [
        ("system", "you are a helpful bot"),
        ("user", "hi"),
        ("assistant", "hello how are you"),
        ("user", "the cat"),
        ("assistant", "sat on the mat"),
    ]
    ids, mask = conversation_tokens(turns, tok, "tokenizer")
    messages = [{"role": r, "content": c} for r, c in turns]
    assert ids == _reference(tokenizer_dir, messages, False)
    end = tok.token_id("<|im_end|>")
    answers = [[*(tok.token_id(w) for w in t.split()), end] for r, t in turns if r == "assistant"]
    # the masked runs are exactly each answer and its end-of-turn token
    runs, run = [], []
    for token, keep in zip(ids, mask):
        if keep:
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    assert runs == answers


def test_generation_stops_at_the_templates_end_of_turn(tokenizer_dir):
    """Rollouts ask the engine to stop at the tokenizer's stop tokens (EOS and
    ``<|im_end|>``); the engine's stop itself is tested in tests/inference/test_engine.py."""
    from hpc_rlhf.config import RolloutConfig
    from hpc_rlhf.trainer.experience import generate_rollout

    tok = load_tokenizer(tokenizer_dir)
    seen = {}

    class Engine:
        def generate(self, prompts, sampling, version, max_new_tokens):
            seen["stop"] = sampling.stop_token_ids
            return []

    generate_rollout(Engine(), tok, [[1, 2]], RolloutConfig(), 1, 0, None)
    assert set(seen["stop"]) == {tok.eos_id, tok.token_id("<|im_end|>")}


def test_a_template_that_is_not_turn_by_turn_is_named(tokenizer_dir, monkeypatch):
    tok = load_tokenizer(tokenizer_dir)
    real = tok.render
    # a template that rewrites earlier turns once a later one exists (not a prefix)
    monkeypatch.setattr(
        tok, "render", lambda m, add_generation_prompt: real(m, add_generation_prompt)[::-1]
    )
    with pytest.raises(Exception, match="cannot be located"):
        conversation_tokens([("user", "hi"), ("assistant", "hello")], tok, "tokenizer")


def test_config_accepts_the_tokenizer_template_only_by_name():
    SFTDataConfig(chat_template="tokenizer").validate()
    with pytest.raises(Exception, match="must contain"):
        SFTDataConfig(chat_template="tokenizers").validate()


def _sample_until_stop(rank, world_size, hf_weights, stop_ids):
    from hpc_rlhf.config import ParallelConfig
    from hpc_rlhf.inference.engine import GenerationConfig, GenerationEngine
    from hpc_rlhf.inference.sampling import SamplingParams
    from tests.inference.common import CFG, build_actor

    state, actor = build_actor(CFG, ParallelConfig(), hf_weights)
    engine = GenerationEngine(actor, CFG, state, GenerationConfig(block_size=16))
    engine.sync_weights(0)
    sampling = SamplingParams(
        temperature=1.0, max_new_tokens=32, n=8, seed=1, stop_token_ids=tuple(stop_ids)
    )
    outs = engine.generate([[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], sampling)
    return [(o.token_ids, o.finish_reason) for o in outs]


def test_the_engine_stops_at_the_templates_end_of_turn_token(tokenizer_dir):
    """A model with a zero LM head samples uniformly over its 256 ids, so the tokenizer's
    stop ids (EOS 0, ``<|im_end|>`` 2) come up by chance: every response ends at its first
    stop token (finish "stop"), or holds none (finish "length")."""
    from tests.dist import run_world
    from tests.inference.common import CFG, hf_causal_lm, hf_state

    tok = load_tokenizer(tokenizer_dir)
    weights = hf_state(hf_causal_lm(CFG))
    weights["lm_head.weight"].zero_()
    (outs,) = run_world(_sample_until_stop, 1, weights, tok.stop_ids)
    stop = set(tok.stop_ids)
    ended_at = []
    for tokens, reason in outs:
        first = next((i for i, t in enumerate(tokens) if t in stop), None)
        if first is None:
            assert reason == "length" and len(tokens) == 32
        else:
            assert reason == "stop" and first == len(tokens) - 1
            ended_at.append(tokens[-1])
    assert tok.token_id("<|im_end|>") in ended_at  # measured: 1 of 32 ends there, 6 at EOS
