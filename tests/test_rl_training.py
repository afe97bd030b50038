"""PPO and GRPO end to end on a tiny real checkpoint (CPU, one process): a verifiable toy
reward rises, every metric reaches metrics.jsonl, a stopped and resumed run repeats the
uninterrupted run's losses exactly, and bad settings are config errors naming the key."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import compose
from tests.sft_helpers import tiny_checkpoint
from train.config import ConfigError

torch.set_num_threads(1)
TARGET = range(512, 640)  # the toy task: reply with tokens of this eighth of the vocabulary


def share_in_target(prompts, responses, response_ids, **_):
    """The toy verifiable reward: the share of the reply's tokens in TARGET (about 1/8 at start)."""
    return [sum(t in TARGET for t in ids) / max(len(ids), 1) for ids in response_ids]


def rl_cfg(run_dir, base, algo: str, *extra: str):
    from train.rl.config import register_rl_configs, validate_rl

    register_rl_configs()
    cfg = compose([f"run_dir={run_dir}", f"init_from={base}", "data.seq_len=56", "rl.max_new_tokens=8",
                   "rl.reward_model=null", f"rl.reward_fn={__name__}:share_in_target", "rl.critic_init=policy",
                   "logger.plot=false", "train.eval_every=0", "checkpoint.every=100", "optim.lr=1e-2",
                   "rl.critic_lr=1e-2", "rl.epochs=4", "rl.kl_coef=0.01", *extra], config_name=algo)
    validate_rl(cfg)
    return cfg


def rl_trainer(cfg):
    """The one loop with the RL task, as launch/ppo.py and launch/grpo.py run it."""
    from train.tasks.rl import RLTask
    from train.trainer import Trainer

    return Trainer(cfg, RLTask(cfg))


def fit(cfg) -> dict:
    return rl_trainer(cfg).fit()


def records(run_dir, kind="train") -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == kind}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


def _rises(rewards: list[float]) -> None:
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, rewards


def test_ppo_raises_a_verifiable_reward_and_logs_every_metric(base, tmp_path):
    run = tmp_path / "ppo"
    fit(rl_cfg(run, base, "ppo", "train.max_steps=14", "rl.prompts_per_step=16"))
    rec = records(run)
    _rises([rec[s]["reward_mean"] for s in sorted(rec)])
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_frac", "value_loss", "explained_var",
                "response_len", "gen_tokens_per_s", "loss", "lr"):
        assert all(key in r for r in rec.values()), key
    assert rec[14]["entropy"] < rec[1]["entropy"]  # the policy concentrates on the rewarded tokens
    assert os.path.isdir(run / "checkpoints" / "step_00000014")


def test_grpo_raises_a_verifiable_reward_without_a_critic(base, tmp_path):
    run = tmp_path / "grpo"
    fit(rl_cfg(run, base, "grpo", "train.max_steps=14", "rl.prompts_per_step=4", "rl.group_size=4"))
    rec = records(run)
    _rises([rec[s]["reward_mean"] for s in sorted(rec)])
    assert all("value_loss" not in r and "kl" in r for r in rec.values())
    assert not os.path.exists(run / "checkpoints" / "step_00000014" / "critic.safetensors")


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_stop_and_resume_repeat_the_uninterrupted_losses(base, tmp_path, algo):
    small = ("train.max_steps=4", "rl.prompts_per_step=4", "rl.epochs=2", "checkpoint.every=100", "rl.group_size=2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    fit(rl_cfg(whole, base, algo, *small))
    stopped = fit(rl_cfg(split, base, algo, *small, "train.stop_at_step=2"))
    assert stopped.get("stopped") and stopped["final_step"] == 2
    critic = os.path.isfile(split / "checkpoints" / "step_00000002" / "critic.safetensors")
    assert critic == (algo == "ppo")
    resumed = fit(rl_cfg(split, base, algo, *small))
    assert resumed["resumed_from"].endswith("step_00000002") and resumed["start_step"] == 2
    a, b = records(whole), records(split)
    keys = ["loss", "reward_mean", "kl", "response_len", "entropy"] + (["value_loss"] if algo == "ppo" else [])
    for step in (3, 4):  # sampling RNG, prompt position, policy (+ critic) + optimizers all restored
        for key in keys:
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])


def test_bad_settings_are_config_errors_naming_the_key(base, tmp_path):
    with pytest.raises(ConfigError, match="rl.reward_model"):
        rl_cfg(tmp_path / "x", base, "ppo", "rl.reward_model=runs/reward")  # both reward sources set
    with pytest.raises(ConfigError, match="rl.minibatches"):
        rl_cfg(tmp_path / "x", base, "grpo", "rl.prompts_per_step=3", "rl.group_size=3", "rl.minibatches=2")
    with pytest.raises(ConfigError, match="backend.zero_stage"):  # DeepSpeed: ZeRO-3 only (tested)
        rl_cfg(tmp_path / "x", base, "ppo", "backend=deepspeed", "backend.zero_stage=2")
    with pytest.raises(ConfigError, match="rl.reward_fn"):
        fit(rl_cfg(tmp_path / "x", base, "ppo", "rl.reward_fn=tests.no_such_module:f"))


@pytest.mark.parametrize("override,key,why", [
    ("lora.rank=0", "lora.rank", "positive"),
    ("lora.alpha=-1", "lora.alpha", "positive"),
    ("lora.targets=[wz]", "lora.targets", "unknown projection"),
    ("lora.name=a-b", "lora.name", "identifier"),
    ("lora.quantize=4bit", "lora.quantize", "does not implement QLoRA"),
    ("prompt_tuning.enabled=true", "prompt_tuning.enabled", "does not implement prompt tuning"),
    ("rl.max_new_tokens=56", "rl.max_new_tokens", "no room for a prompt"),
    ("init_from=no/such/run", "init_from", "launch/sft.py"),
    ("train.compile=true", "train.compile", "recompile"),
    ("train.grad_accum_steps=2", "train.grad_accum_steps", "minibatch"),
    ("lora.dropout=0.1", "lora.dropout", "ratio must be 1"),
])
def test_fine_tuning_settings_rl_cannot_honour_are_config_errors_at_validation(base, tmp_path, override, key, why):
    """validate_rl (which runs before any model is built) names the key and says why."""
    with pytest.raises(ConfigError, match=why) as e:
        rl_cfg(tmp_path / "x", base, "grpo", "lora.enabled=true", override)
    assert e.value.key == key


def test_lora_trains_adapters_only_and_its_reference_is_the_base(base, tmp_path):
    from train.checkpoint.full_state import load_model
    from train.rl.rollout import response_logprobs

    t = rl_trainer(rl_cfg(tmp_path / "lora", base, "grpo", "train.max_steps=2", "rl.prompts_per_step=2",
                         "rl.group_size=2", "rl.minibatches=1", "lora.enabled=true"))
    assert t.task.reference is None  # no second copy: the policy with its adapters off
    frozen = {n: p.detach().clone() for n, p in t.task.policy.named_parameters() if not p.requires_grad}
    trained = [n for n, p in t.task.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    t.fit()
    assert all(torch.equal(frozen[n], p) for n, p in t.task.policy.named_parameters() if n in frozen)
    r, _ = t.task.rollout(t.task.val_prompts[:3], torch.Generator().manual_seed(5))
    plain, _ = load_model(base, "cpu", verify="off")
    with torch.no_grad():
        base_lp = response_logprobs(plain, r, 1.0)[0]
        policy_lp = response_logprobs(t.task.policy, r, 1.0)[0]
    assert torch.allclose(t.task.reference_logprobs(r), base_lp, atol=1e-5)
    assert not torch.allclose(policy_lp, base_lp, atol=1e-3)  # the adapters did train
    # the checkpoint is an adapter checkpoint launch/generate.py loads as an LM: its base plus the adapter
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch"))
    from _common import load_model_and_tokenizer

    step = tmp_path / "lora" / "checkpoints" / "step_00000002"
    assert os.path.isfile(step / "adapter_config.json") and not os.path.exists(step / "model.safetensors")
    loaded, _, _ = load_model_and_tokenizer(str(step), torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(response_logprobs(loaded, r, 1.0)[0], policy_lp, atol=1e-5)
    # and a resumed run reads it back: the adapter weights are the trained ones
    t2 = rl_trainer(rl_cfg(tmp_path / "lora", base, "grpo", "train.max_steps=3", "rl.prompts_per_step=2",
                          "rl.group_size=2", "rl.minibatches=1", "lora.enabled=true"))
    assert t2.resume().endswith("step_00000002")
    with torch.no_grad():
        assert torch.allclose(response_logprobs(t2.task.policy, r, 1.0)[0], policy_lp, atol=1e-6)


def _reward_dir(path, base, max_seq_len=None, tokenizer_bytes=None) -> str:
    """A reward-model weights directory (model_config.yaml, model.safetensors, tokenizer.model) on
    the tiny base's architecture: its tokenizer, or other bytes; its max_seq_len, or another."""
    import shutil

    from omegaconf import OmegaConf

    from model.value_head import ValueModel
    from train import checkpoint as ckpt
    from train.checkpoint.full_state import FullState

    step = ckpt.resolve(str(base), "off")
    mc = ckpt.read_model_config(step)
    if max_seq_len is not None:
        mc.max_seq_len = max_seq_len
    os.makedirs(path)
    FullState(model=ValueModel(mc).state_dict()).save(str(path))
    OmegaConf.save(OmegaConf.structured(mc), os.path.join(path, ckpt.MODEL_CONFIG))
    shutil.copyfile(os.path.join(step, ckpt.TOKENIZER), os.path.join(path, ckpt.TOKENIZER))
    if tokenizer_bytes is not None:
        with open(os.path.join(path, ckpt.TOKENIZER), "wb") as f:
            f.write(tokenizer_bytes)
    return str(path)


def test_a_reward_model_of_another_tokenizer_or_shorter_context_is_refused(base, tmp_path):
    """The reward model must read the policy's token ids and hold prompt + reply (data.seq_len=56)."""

    def trainer(reward):
        return rl_trainer(rl_cfg(tmp_path / "run", base, "ppo", "rl.reward_fn=null", f"rl.reward_model={reward}",
                                "train.max_steps=1", "rl.prompts_per_step=2", "rl.minibatches=1"))

    good = trainer(_reward_dir(tmp_path / "same", base))  # same tokenizer file, same context: accepted
    r, _ = good.task.rollout(good.task.val_prompts[:2], torch.Generator().manual_seed(0))
    assert good.task.scorer(r, ["a", "b"]).shape == (2,)
    del good
    with pytest.raises(ConfigError, match="another tokenizer") as e:
        trainer(_reward_dir(tmp_path / "other_tok", base, tokenizer_bytes=b"another vocabulary"))
    assert e.value.key == "rl.reward_model"
    with pytest.raises(ConfigError, match="max_seq_len=32") as e:
        trainer(_reward_dir(tmp_path / "short", base, max_seq_len=32))
    assert e.value.key == "rl.reward_model"


def test_resume_refuses_a_reference_whose_checkpoint_changed(base, tmp_path):
    """The reference is rebuilt from init_from at resume: init_from retrained in place since
    the stop (new weights, a valid manifest) is refused, naming init_from and both digests."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.ckpt_helpers import reseal
    from train import checkpoint as ckpt

    init = tmp_path / "init"
    shutil.copytree(base, init)
    small = ("train.max_steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.minibatches=1")
    stopped = fit(rl_cfg(tmp_path / "run", init, "grpo", *small, "train.stop_at_step=1"))
    assert stopped["final_step"] == 1
    step = ckpt.resolve(str(init), "off")
    before = ckpt.digest(step)
    weights = load_file(os.path.join(step, ckpt.MODEL_FILE))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # "retrained": other weights at the same path
    save_file(weights, os.path.join(step, ckpt.MODEL_FILE))
    reseal(step)
    assert ckpt.resolve(str(init), "full") == step and ckpt.digest(step) != before  # a valid, other checkpoint
    with pytest.raises(ConfigError, match="digest") as e:
        fit(rl_cfg(tmp_path / "run", init, "grpo", *small))
    assert e.value.key == "init_from" and before in str(e.value) and ckpt.digest(step) in str(e.value)


def test_a_stop_request_checkpoints_the_rollout_step_and_the_run_resumes_from_it(base, tmp_path, monkeypatch):
    """RL runs in the one loop: a scheduler's stop request ($KILN_STOP_FILE, what slurm/common.sh
    writes on SIGUSR1/SIGTERM) ends the run after the current rollout step with a checkpoint,
    and the next launch continues from it."""
    stop = tmp_path / "stop"
    stop.write_text("")
    monkeypatch.setenv("KILN_STOP_FILE", str(stop))
    small = ("train.max_steps=3", "rl.prompts_per_step=2", "rl.group_size=2", "rl.minibatches=1",
             "train.eval_every=3")
    first = fit(rl_cfg(tmp_path / "run", base, "grpo", *small))
    assert first.get("stopped") and first["final_step"] == 1
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000001")
    # one evaluation so far (step 0): no before/after table yet, and none is announced
    assert "generations_path" not in first and not os.path.exists(tmp_path / "run" / "generations.md")
    monkeypatch.delenv("KILN_STOP_FILE")
    second = fit(rl_cfg(tmp_path / "run", base, "grpo", *small))
    assert second["resumed_from"].endswith("step_00000001") and second["final_step"] == 3
    # the resumed run's evaluation joins the first run's step-0 one: the table compares them
    with open(tmp_path / "run" / "eval_samples.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 3]
    assert second["generations_path"] and "(step 0)" in open(second["generations_path"]).read()


def test_a_nan_step_rolls_back_even_between_logging_steps(base, tmp_path, monkeypatch):
    """RL samples its next rollout from the weights: a NaN step must be caught before that,
    not at the next logging step (sampling from NaN weights raises). With train.log_every=4
    and a checkpoint every 2 steps, step 3 poisons the weights and its loss: the loop rolls
    back to step 2, skips step 3's prompts and finishes."""
    from train.tasks.rl import RLTask

    real, poisoned = RLTask.optimise, []

    def optimise(self, *a, **k):
        metrics = real(self, *a, **k)
        if self.trainer.state.step == 2 and not poisoned:  # computing step 3
            poisoned.append(True)
            with torch.no_grad():
                for p in self.backend.raw_model.parameters():
                    p.fill_(float("nan"))
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(RLTask, "optimise", optimise)
    small = ("train.max_steps=4", "rl.prompts_per_step=2", "rl.group_size=2", "rl.minibatches=1",
             "checkpoint.every=2", "train.nan_policy=rollback", "train.log_every=4")
    t = rl_trainer(rl_cfg(tmp_path / "run", base, "grpo", *small))
    result = t.fit()
    assert poisoned and t.rollbacks == 1 and result["final_step"] == 4
    assert t.state.skipped_batches == {3: 1}
    assert all(torch.isfinite(p).all() for p in t.backend.raw_model.parameters())
