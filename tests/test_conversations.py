"""Multi-turn prompts kept whole: the sampler's completions carry the conversation it rendered (data.system_prompt
applied), the reward model and the judge are shown all of it, and the implicit labeler and training score the
sampler's own prompt tokens."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch

from dpo_ray import schemas
from dpo_ray.config import load_config
from dpo_ray.logprobs import SequenceScorer
from dpo_ray.models import ModelSpec
from dpo_ray.ops.judge import JudgeScorer, JudgeSpec
from dpo_ray.ops.rewards import RewardModelScorer
from dpo_ray.ops.samplers import SamplerSpec, TransformersSampler, sample_logp_is_exact
from dpo_ray.ops.scorers import LogProbScorer, ScorerSpec
from dpo_ray.stages import label
from dpo_ray.stages.train import dpo_forward
from dpo_ray.text import sampled_messages_json

POLICY = "builtin:tiny-llama"
SYSTEM = "You are a film critic."
HISTORY = [{"role": "user", "content": "Name a heist film."}, {"role": "assistant", "content": "Heat."},
           {"role": "user", "content": "Review it."}]
CONVERSATION = [{"role": "system", "content": SYSTEM}, *HISTORY]
# Writes BOS itself, as Llama 3's template does, and every turn with its role.
BOS_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _config(*overrides: str):
    return load_config("configs/tiny.yaml", [f"data.system_prompt={SYSTEM}", *overrides])


@pytest.fixture(scope="module")
def sampled():
    """COMPLETIONS of a chat given without a system turn and of a plain-text prompt, by the transformers sampler
    in this process with data.system_prompt set (3 samples of up to 4 tokens each)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "get_gpu_ids", lambda: [])
        sampler = TransformersSampler(SamplerSpec.of(_config(), POLICY, 3, 4, 1.0, 0))
    prompts = schemas.rows_to_table([
        {"prompt_id": "chat", "prompt": "Review it.", "messages_json": json.dumps(HISTORY), "split": "train"},
        {"prompt_id": "plain", "prompt": "Review Heat.", "messages_json": None, "split": "train"},
    ], schemas.PROMPTS)
    yield sampler(prompts)
    torch.set_num_threads(threads)  # the sampler set run.torch_threads for this process


def _rows(table: pa.Table, prompt_id: str) -> pa.Table:
    return table.filter(pc.equal(table["prompt_id"], prompt_id))


def test_completions_carry_the_conversation_the_sampler_rendered(sampled, tokenizer):
    assert sampled.schema == schemas.COMPLETIONS
    chat, plain = _rows(sampled, "chat").to_pylist(), _rows(sampled, "plain").to_pylist()
    assert len(chat) == len(plain) == 3
    assert all(json.loads(r["messages_json"]) == CONVERSATION for r in chat)
    assert all(json.loads(r["messages_json"]) == [{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": "Review Heat."}] for r in plain)
    # The recorded conversation is the one the prompt tokens are: the policy's template of it, system turn included.
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert chat[0]["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Without a system prompt a plain-text prompt is its text alone; a chat is kept as it was given.
    assert sampled_messages_json("Review Heat.", None, None) is None
    assert json.loads(sampled_messages_json("Review it.", json.dumps(HISTORY), None)) == HISTORY


@pytest.fixture
def reward_scorer(monkeypatch, reward_model):
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    cfg = _config()
    return RewardModelScorer(ModelSpec.of(cfg, reward_model), cfg.label.batch_size)


def test_the_reward_model_reads_the_whole_conversation_in_its_own_template_with_one_bos(reward_scorer):
    tokenizer = reward_scorer.tokenizer
    tokenizer.add_bos_token = True  # as Llama 3's tokenizer does: a second BOS would come from here
    tokenizer.chat_template = BOS_TEMPLATE
    ids = reward_scorer.encode(["Review it."], [json.dumps(CONVERSATION)], ["Gripping."])["input_ids"][0].tolist()
    full = CONVERSATION + [{"role": "assistant", "content": "Gripping."}]
    assert ids == tokenizer.apply_chat_template(full)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == (f"{tokenizer.bos_token}system: {SYSTEM}\nuser: Name a heist film.\n"
                                     "assistant: Heat.\nuser: Review it.\nassistant: Gripping.\n")


def test_a_reward_model_without_a_template_reads_the_turns_as_text(reward_scorer):
    tokenizer = reward_scorer.tokenizer
    tokenizer.chat_template = None
    ids = reward_scorer.encode(["Review it."], [json.dumps(CONVERSATION)], ["Gripping."])["input_ids"][0].tolist()
    assert ids == tokenizer(f"{SYSTEM}\n\nHuman: Name a heist film.\n\nAssistant: Heat.\n\nHuman: Review it.\n\n"
                            "Assistant: Gripping.")["input_ids"]


def test_the_judge_is_shown_the_whole_conversation(monkeypatch):
    judge = JudgeScorer(JudgeSpec.of(_config("label.labeler=judge")))
    shown = []
    monkeypatch.setattr(judge, "prefer_a", lambda prompt, orderings: shown.append(prompt) or [1.0] * len(orderings))
    group = pa.Table.from_pylist([{"prompt_id": "chat", "prompt": "Review it.", "messages_json": json.dumps(CONVERSATION),
                                   "completion": text} for text in ("Gripping.", "Dull.")])
    judge(group)
    assert shown == [f"{SYSTEM}\n\nHuman: Name a heist film.\n\nAssistant: Heat.\n\nHuman: Review it."]


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_evaluate_takes_the_sampling_models_log_prob_from_its_sampler_in_float32_inference(monkeypatch, dtype):
    # bf16-mixed samples and scores in float32 outside training (models.inference_dtype), so there too the
    # sampler's sample_logp is the evaluate scorer's log-prob and the scoring pass of the sampling model is skipped.
    # A bf16 or fp16 model is not: its cached decode steps and a whole-sequence forward round differently.
    cfg = _config(f"model.dtype={dtype}")
    assert sample_logp_is_exact(cfg) and not sample_logp_is_exact(_config("model.dtype=bfloat16"))
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    threads = torch.get_num_threads()
    sampler = TransformersSampler(SamplerSpec.of(cfg, POLICY, 2, 8, 1.0, 0))
    prompts = schemas.rows_to_table([{"prompt_id": "plain", "prompt": "Review Heat.", "messages_json": None,
                                      "split": "train"}], schemas.PROMPTS)
    scored = LogProbScorer(ScorerSpec.of(cfg, POLICY, {"completion_ids": "logp"}))(sampler(prompts))
    torch.set_num_threads(threads)  # the sampler and the scorer each set run.torch_threads for this process
    torch.testing.assert_close(torch.tensor(scored["logp"].to_pylist()),
                               torch.tensor(scored["sample_logp"].to_pylist()), atol=1e-4, rtol=0)


def test_the_implicit_labeler_and_training_score_the_tokens_the_sampler_used(sampled, tokenizer, monkeypatch):
    cfg = _config()
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    # A prompt text that re-tokenized would be other tokens: neither may read it.
    rows = sampled.set_column(sampled.schema.get_field_index("prompt"), schemas.COMPLETIONS.field("prompt"),
                              pa.array(["Something else entirely."] * sampled.num_rows))
    # The implicit labeler's scorer (ops.scorers.completion_logps_column): in fp32 the transformers sampler's
    # sample_logp is the scoring forward's log-prob of the very same tokens.
    scored = LogProbScorer(ScorerSpec.of(cfg, POLICY, {"completion_ids": "logp"}))(rows)
    torch.testing.assert_close(torch.tensor(scored["logp"].to_pylist()),
                               torch.tensor(scored["sample_logp"].to_pylist()), atol=1e-4, rtol=0)
    # Pairs carry the sampler's prompt_ids, and training's forward scores them as the sampler did.
    chat = _rows(rows, "chat")
    chat = chat.append_column("reward", pa.array([float(i) for i in chat["sample_index"].to_pylist()]))
    chat = chat.append_column("filter_reward", pa.nulls(chat.num_rows, pa.float64()))
    (pair,), _ = label._group_pairs(chat, cfg.label)
    assert pair["prompt_ids"] == chat["prompt_ids"][0].as_py()
    by_ids = {tuple(r["completion_ids"]): r["sample_logp"] for r in chat.to_pylist()}
    batch = {name: [pair[name]] for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
    batch.update({name: [0.0] for name in schemas.REFERENCE_COLUMNS})
    model = SequenceScorer(ModelSpec.of(cfg, POLICY).load_causal_lm().eval())
    with torch.no_grad():
        _, metrics, _ = dpo_forward(model, batch, tokenizer.pad_token_id, cfg.train)
    assert metrics["logps/chosen"] == pytest.approx(by_ids[tuple(pair["chosen_ids"])], abs=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(by_ids[tuple(pair["rejected_ids"])], abs=1e-4)


@pytest.mark.slow
def test_completions_an_earlier_version_sampled_are_labeled_with_the_conversation_null(ray_local, reward_model,
                                                                                       sampled, tmp_path, caplog):
    old = sampled.drop_columns(["messages_json"])
    (tmp_path / "completions").mkdir()
    pq.write_table(old, tmp_path / "completions" / "part-0.parquet")
    cfg = _config("label.labeler=reward_model", f"label.reward_model={reward_model}")
    stats = label.label_completions(cfg, tmp_path / "completions", tmp_path / "out", None)
    assert stats["completions"] == 6
    scored = schemas.read_table(tmp_path / "out" / "scored", schemas.SCORED)
    assert scored["messages_json"].null_count == 6
    assert "sampled by an earlier dpo-ray" in caplog.text
