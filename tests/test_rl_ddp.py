"""PPO and GRPO under 2-process DDP (torchrun, gloo on CPU) against one process.

One launch runs both algorithms on 2 ranks: each rank samples its own half of the step's
prompts (rank r rows r*B..(r+1)*B-1 of the global batch), then runs the first step's two
optimisation epochs over them. Rank 0 saves every rank's rollout (prompt ids, responses,
sampling log-probs), the step's metrics and the policy's (and critic's) weights after the
step. Here one process runs the same step on those same rollouts, concatenated in rank order
(the global batch), from the same seeds. Sampling is the only place where the two differ by
construction (each rank draws from its own generator), so giving both the same rollouts
makes the comparison exact in principle: the whitening, explained variance and reported
statistics span every rank's rows, and the per-rank losses are weighted by their share of
valid tokens, so the averaged gradient is the one-process gradient. What remains is float
summation order (a rank's prompts are left-padded to its own widest prompt, and the loss
sums split across ranks): the tolerance is 1e-4 absolute on the losses and metrics and on the
weights after two optimiser steps (seen: about 1e-7). The second epoch's loss is computed
after one update, so a wrong gradient on either rank moves it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA = ["rl.prompts_per_step=4", "rl.epochs=2", "rl.minibatches=1", "train.max_steps=1", "rl.group_size=2"]
ALGOS = ("ppo", "grpo")
TOL = 1e-4


def _cfg(run_dir, base, algo, backend):
    from tests.test_rl_training import rl_cfg

    return rl_cfg(run_dir, base, algo, f"backend={backend}", *EXTRA)


def _weights(trainer) -> dict:
    out = {"policy." + k: v.detach().clone() for k, v in trainer.backend.raw_model.state_dict().items()}
    if hasattr(trainer.task, "critic"):
        out.update({"critic." + k: v.detach().clone() for k, v in trainer.task.critic.state_dict().items()})
    return out


def worker(base: str, out_dir: str) -> None:
    """Runs under torchrun: one step of each algorithm on this rank's prompts."""
    import torch.distributed as dist

    from train.rl.loop import RLTrainer

    for algo in ALGOS:
        trainer = RLTrainer(_cfg(os.path.join(out_dir, algo), base, algo, "ddp"))
        assert trainer.world == 2 and isinstance(trainer.policy, torch.nn.parallel.DistributedDataParallel)
        r, scores, tps = trainer.collect()
        P = r.prompt_len
        mine = {"prompts": [row[:P][km[:P]].tolist() for row, km in zip(r.tokens, r.key_mask)],
                "responses": r.responses.clone(), "logprobs": r.logprobs.clone(), "scores": scores.clone()}
        metrics = trainer.optimise(r, scores, tps)
        every = [None, None]
        dist.all_gather_object(every, mine)
        if trainer.rank == 0:
            torch.save({"ranks": every, "metrics": metrics, "weights": _weights(trainer)},
                       os.path.join(out_dir, f"{algo}.pt"))
        dist.barrier()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    from tests.sft_helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


@pytest.fixture(scope="module")
def launched(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_ddp")
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(random.randint(20000, 40000)),
           os.path.abspath(__file__), base, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return {algo: torch.load(os.path.join(out, f"{algo}.pt"), weights_only=False) for algo in ALGOS}


def _single_step(base, tmp_path, algo, saved):
    """One process, the same seeds, the 2-process run's rollouts in rank order."""
    from train.rl.loop import RLTrainer
    from train.rl.rollout import build_rollout

    trainer = RLTrainer(_cfg(tmp_path / algo, base, algo, "single"))
    ranks = saved["ranks"]
    prompts = [p for rank in ranks for p in rank["prompts"]]
    r = build_rollout(prompts, torch.cat([k["responses"] for k in ranks]), torch.cat([k["logprobs"] for k in ranks]),
                      trainer.stop_ids, trainer.pad_id)
    scores = trainer.scorer(r, [""] * len(prompts))
    assert torch.equal(scores, torch.cat([k["scores"] for k in ranks]))  # the reward reads the same rows
    return trainer.optimise(r, scores), _weights(trainer), ranks


@pytest.mark.parametrize("algo", ALGOS)
def test_two_process_ddp_first_step_matches_one_process_on_the_same_rollouts(base, launched, tmp_path, algo):
    saved = launched[algo]
    metrics, weights, ranks = _single_step(base, tmp_path, algo, saved)
    rows = 4 * (2 if algo == "grpo" else 1)
    assert [len(k["prompts"]) for k in ranks] == [rows // 2, rows // 2]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank sampled its own prompts
    # the same prompts, in the same order, as one process takes from the stream for its step
    from train.rl.loop import RLTrainer

    one = RLTrainer(_cfg(tmp_path / f"{algo}_stream", base, algo, "single"))
    taken = [p[1] for p in one.prompts.take(4) for _ in range(one.task.samples_per_prompt)]
    assert taken == [p for k in ranks for p in k["prompts"]]
    keys = ["loss", "entropy", "reward_mean", "reward_std", "kl", "response_len", "clip_frac"]
    keys += ["value_loss", "explained_var"] if algo == "ppo" else []
    two = saved["metrics"]
    for k in keys:
        assert abs(two[k] - metrics[k]) <= TOL, (k, two[k], metrics[k])
    assert metrics["clip_frac"] > 0 or abs(metrics["loss"]) > 1e-3  # the step did something to compare
    assert weights.keys() == saved["weights"].keys()
    moved = 0.0
    for k, w in weights.items():
        assert torch.allclose(w.float(), saved["weights"][k].float(), atol=TOL, rtol=0), k
    for k, w in one.backend.raw_model.state_dict().items():  # the step moved the policy beyond the tolerance
        moved = max(moved, float((w - weights["policy." + k]).abs().max()))
    assert moved > 100 * TOL


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    torch.set_num_threads(1)
    worker(sys.argv[1], sys.argv[2])
