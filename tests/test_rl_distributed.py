"""PPO, GRPO and GRPO with LoRA under 2-process DDP, FSDP (torchrun) and ZeRO-3 (deepspeed),
gloo on CPU, against one process; and a 2-process DDP run saved and resumed against the run
that went on.

One launch per launcher runs both algorithms on its backends, 2 ranks: each rank samples its
own half of the step's prompts (rank r rows r*B..(r+1)*B-1 of the global batch), then runs the first step's two
optimisation epochs over them. Rank 0 saves every rank's rollout (prompt ids, responses,
sampling log-probs; each row then stopped at a set length, so ranks hold different token
counts), the step's metrics and the policy's (and critic's) weights after the
step. Here one process runs the same step on those same rollouts, concatenated in rank order
(the global batch), from the same seeds. Sampling is the only place where the two differ by
construction (each rank draws from its own generator), so giving both the same rollouts
makes the comparison exact in principle: the whitening, explained variance and reported
statistics span every rank's rows, and the per-rank losses are weighted by their share of
valid tokens, so the averaged gradient is the one-process gradient. What remains is float
summation order (a rank's prompts are left-padded to its own widest prompt, and the loss
sums split across ranks): the tolerance is 1e-5 absolute on the losses and metrics (seen: under 5e-7)
and 2e-4 on the weights after two optimiser steps (seen: under 6e-5; Adam divides each
gradient entry by its own running scale, so float noise in near-zero entries shows there). The second epoch's loss is computed
after one update, so a wrong gradient on either rank moves it. Before the step every rank
also evaluates (the held-out prompts with one fixed seed, through the sharded policy and
reference) and gets one process's samples, reward and KL.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from tests.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA = ["rl.prompts_per_step=4", "rl.epochs=2", "rl.minibatches=1", "train.max_steps=1", "rl.group_size=2"]
ALGOS = ("ppo", "grpo", "grpo_lora")  # grpo_lora: GRPO with lora.enabled=true (reference: adapters off)
LAUNCHERS = {"ddp": "torchrun", "fsdp": "torchrun", "deepspeed": "deepspeed"}
RUNS = [(backend, algo) for backend in LAUNCHERS for algo in ALGOS]
OVERRIDES = {"deepspeed": ["backend.zero_stage=3"]}
TOL = 1e-5  # losses, metrics, sampling log-probs
TOL_WEIGHTS = 2e-4  # weights after the step


def _cfg(run_dir, base, algo, backend):
    from tests.test_rl_training import rl_cfg

    lora = ["lora.enabled=true"] if algo.endswith("_lora") else []
    return rl_cfg(run_dir, base, algo.removesuffix("_lora"), f"backend={backend}", *OVERRIDES.get(backend, []),
                  *EXTRA, *lora)


def _weights(trainer) -> dict:
    """Whole tensors (FSDP and ZeRO-3 shards gathered: every rank calls this)."""
    model = trainer.backend.raw_model
    gathered = contextlib.nullcontext()
    if trainer.backend.name == "deepspeed":
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gathered:
        out = {"policy." + k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    if hasattr(trainer.task.algo, "critic"):
        out.update({"critic." + k: v.detach().clone() for k, v in trainer.task.algo.critic.state_dict().items()})
    return out


def cut(trainer, r, rank: int):
    """``r`` with row i stopped at a length set by (i, rank): the tiny model rarely samples a
    stop token, and rows of equal length would hide a wrong weighting of ranks' token means."""
    from train.rl.rollout import build_rollout

    P, resp = r.prompt_len, r.responses.clone()
    for i in range(len(resp)):
        resp[i, (3 * i + 5 * rank) % resp.shape[1]] = trainer.task.stop_ids[0]
    prompts = [row[:P][km[:P]].tolist() for row, km in zip(r.tokens, r.key_mask)]
    return build_rollout(prompts, resp, r.logprobs, trainer.task.stop_ids, trainer.task.pad_id)


def worker(base: str, out_dir: str, backends: list[str]) -> None:
    """Runs under torchrun: one step of each algorithm on this rank's prompts."""
    import torch.distributed as dist

    from tests.test_rl_training import rl_trainer

    for backend, algo in [run for run in RUNS if run[0] in backends]:
        trainer = rl_trainer(_cfg(os.path.join(out_dir, backend, algo), base, algo, backend))
        assert trainer.task.world == 2 and trainer.backend.name == backend
        if algo.endswith("_lora"):  # the adapters train, the reference is the policy with them off
            assert trainer.task.reference is None
            trained = [n for n, p in trainer.backend.raw_model.named_parameters() if p.requires_grad]
            assert trained and all("lora_" in n for n in trained), trained
        elif backend == "ddp":
            assert isinstance(trainer.task.policy, torch.nn.parallel.DistributedDataParallel)
            assert all(p.numel() == q.numel() for p, q in zip(trainer.task.reference.parameters(),
                                                               trainer.task.policy.module.parameters()))
        elif backend == "fsdp":  # sharded: each rank holds half of every weight, the reference's too
            for model in (trainer.task.policy, trainer.task.reference):
                held = [(p.to_local().numel(), p.numel()) for p in model.parameters()]
                assert all(2 * local == whole for local, whole in held), held
            assert not any(p.requires_grad for p in trainer.task.reference.parameters())
        else:  # ZeRO-3: each rank holds a partition, of the reference too
            for model in (trainer.backend.raw_model, trainer.task.reference):
                held = [(p.ds_tensor.numel(), p.ds_numel) for p in model.parameters()]
                assert all(2 * local == whole for local, whole in held), held
            assert not any(p.requires_grad for p in trainer.task.reference.parameters())
        evaluated = trainer.task.sample_held_out()  # every rank, collectively: sharded policy and reference alike
        sampled, _, tps = trainer.task.collect()
        r = cut(trainer, sampled, trainer.task.rank)
        scores = trainer.task.scorer(r, [""] * len(r.tokens))
        P = r.prompt_len
        mine = {"prompts": [row[:P][km[:P]].tolist() for row, km in zip(r.tokens, r.key_mask)],
                "sampled": sampled.responses.clone(), "sampled_logprobs": sampled.logprobs.clone(),
                "responses": r.responses.clone(), "logprobs": r.logprobs.clone(), "scores": scores.clone(),
                "evaluated": evaluated}
        metrics = trainer.task.optimise(r, scores, tps)
        weights = _weights(trainer)  # after the first step (every rank: shards are gathered)
        if backend == "ddp" and algo == "grpo":  # every rank's sampler state is checkpointed and restored
            trainer.save()
            again = rl_trainer(_cfg(os.path.join(out_dir, backend, algo), base, algo, backend))
            assert again.resume() is not None
            mine["sampler_state"] = trainer.task.generator.get_state().clone()
            mine["resumed_sampler_state"] = again.task.generator.get_state().clone()
            # the next rollout step, by the run that went on and by the resumed one, from the
            # same global RNG (both live in this process; the resume restored the saved one)
            rng = torch.get_rng_state()
            mine["next_step"] = trainer.task.optimise(*trainer.task.collect())
            torch.set_rng_state(rng)
            mine["resumed_next_step"] = again.task.optimise(*again.task.collect())
            del again
        every = [None, None]
        dist.all_gather_object(every, mine)
        if trainer.task.rank == 0:
            torch.save({"ranks": every, "metrics": metrics, "weights": weights},
                       os.path.join(out_dir, f"{backend}_{algo}.pt"))
        dist.barrier()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    from tests.sft_helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


@pytest.fixture(scope="module")
def launched(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    for launcher in ("torchrun", "deepspeed"):  # one launch each, every backend it starts
        port = free_port()
        start = ["torchrun", "--nproc_per_node", "2"] if launcher == "torchrun" else ["deepspeed", "--num_gpus", "2"]
        backends = ",".join(b for b, how in LAUNCHERS.items() if how == launcher)
        cmd = [*start, "--master_port", port, os.path.abspath(__file__), base, str(out), backends]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return {run: torch.load(os.path.join(out, "_".join(run) + ".pt"), weights_only=False) for run in RUNS}


def _single_step(base, tmp_path, algo, saved):
    """One process, the same seeds, the 2-process run's rollouts in rank order."""
    from tests.test_rl_training import rl_trainer
    from train.rl.rollout import build_rollout

    trainer = rl_trainer(_cfg(tmp_path / algo, base, algo, "single"))
    ranks = saved["ranks"]
    prompts = [p for rank in ranks for p in rank["prompts"]]
    r = build_rollout(prompts, torch.cat([k["responses"] for k in ranks]), torch.cat([k["logprobs"] for k in ranks]),
                      trainer.task.stop_ids, trainer.task.pad_id)
    scores = trainer.task.scorer(r, [""] * len(prompts))
    assert torch.equal(scores, torch.cat([k["scores"] for k in ranks]))  # the reward reads the same rows
    return trainer.task.optimise(r, scores), _weights(trainer), ranks


def test_a_resumed_two_process_run_restores_each_ranks_own_sampler_state(launched):
    """After a 2-process DDP step, a save and a resume: each rank's sampling generator is back
    where that rank's was (not rank 0's, not a fresh seed), and the resumed run's next step
    (sampling, scoring, two epochs of updates) gives the uninterrupted run's losses and metrics
    exactly."""
    ranks = launched[("ddp", "grpo")]["ranks"]
    assert not torch.equal(ranks[0]["sampler_state"], ranks[1]["sampler_state"])
    for k in ranks:
        assert torch.equal(k["resumed_sampler_state"], k["sampler_state"])
    # and the resumed run's next step is the uninterrupted run's, on every rank
    for k in ranks:
        straight, resumed = (dict(m, gen_tokens_per_s=None) for m in (k["next_step"], k["resumed_next_step"]))
        assert resumed == straight, (resumed, straight)  # everything but the clock
        assert k["next_step"]["reward_mean"] != 0 or k["next_step"]["loss"] != 0  # a step to compare


@pytest.mark.parametrize("backend,algo", RUNS)
def test_two_process_first_step_matches_one_process_on_the_same_rollouts(base, launched, tmp_path, backend, algo):
    saved = launched[(backend, algo)]
    metrics, weights, ranks = _single_step(base, tmp_path, algo, saved)
    rows = 4 * (2 if algo.startswith("grpo") else 1)
    assert [len(k["prompts"]) for k in ranks] == [rows // 2, rows // 2]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank sampled its own prompts
    # the same prompts, in the same order, as one process takes from the stream for its step
    from tests.test_rl_training import rl_trainer

    one = rl_trainer(_cfg(tmp_path / f"{algo}_stream", base, algo, "single"))
    taken = [p[1] for p in one.task.prompts.take(4) for _ in range(one.task.algo.samples_per_prompt)]
    assert taken == [p for k in ranks for p in k["prompts"]]
    # rank 0 samples with the one-process generator (rl.seed): its rows alone, sampled by one
    # process, are the same tokens
    g = one.task.algo.samples_per_prompt
    alone = one.task.rollout([("", ids) for ids in ranks[0]["prompts"][::g]], one.task.generator)[0]
    m = alone.response_mask
    assert torch.equal(alone.responses[m], ranks[0]["sampled"][m])
    assert torch.allclose(alone.logprobs, ranks[0]["sampled_logprobs"], atol=TOL, rtol=0)
    from train.rl.rollout import response_mask

    # evaluation before the step (every rank, the same held-out prompts and seed) is one process's
    ev = one.task.sample_held_out()
    assert ev is not None and len(ev["samples"]) > 1
    for k in ranks:
        assert [x["reply"] for x in k["evaluated"]["samples"]] == [x["reply"] for x in ev["samples"]]
        for key in ("eval_reward_mean", "eval_kl", "eval_response_len"):
            assert abs(k["evaluated"][key] - ev[key]) <= TOL, (key, k["evaluated"][key], ev[key])
    counts = [int(response_mask(k["responses"], one.task.stop_ids).sum()) for k in ranks]
    assert counts[0] != counts[1]  # the ranks hold different numbers of valid tokens
    keys = ["loss", "entropy", "reward_mean", "reward_std", "kl", "response_len", "clip_frac"]
    keys += ["value_loss", "explained_var"] if algo == "ppo" else []
    two = saved["metrics"]
    for k in keys:
        assert abs(two[k] - metrics[k]) <= TOL, (k, two[k], metrics[k])
    assert metrics["clip_frac"] > 0 or abs(metrics["loss"]) > 1e-3  # the step did something to compare
    assert weights.keys() == saved["weights"].keys()
    moved = 0.0
    for k, w in weights.items():
        assert torch.allclose(w.float(), saved["weights"][k].float(), atol=TOL_WEIGHTS, rtol=0), k
    for k, w in one.backend.raw_model.state_dict().items():  # the step moved the policy beyond the tolerance
        moved = max(moved, float((w - weights["policy." + k]).abs().max()))
    assert moved > 10 * TOL_WEIGHTS


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    worker(args[0], args[1], args[2].split(","))
