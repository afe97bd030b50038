"""Score preference pairs (or replies) with a reward model trained by launch/reward.py.

    python launch/score_rewards.py runs/reward data_pipeline/assets/sft/python_prefs.jsonl
    python launch/score_rewards.py runs/reward pairs.jsonl --out scores.jsonl

Reads the checkpoint (run dir, checkpoints root or step dir; verified against its manifest),
encodes every record's prompt + chosen and prompt + rejected with the checkpoint's tokenizer
and chat template exactly as training did, and prints the pairwise accuracy (chosen scored
above rejected) and the mean margin; --out writes each record's two rewards.
"""

import _bootstrap

import argparse
import json
import os
import sys
from collections import Counter

import torch


@_bootstrap.exit_on_checkpoint_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("pairs", help="JSONL / Parquet / HF dataset dir of {prompt, chosen, rejected} records")
    ap.add_argument("--out", help="JSONL with each record's reward_chosen / reward_rejected")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=0, help="tokens per row (default: the model's max_seq_len)")
    a = ap.parse_args(argv)

    from data_pipeline.tokenizer import Tokenizer
    from train import checkpoint as ckpt
    from train.checkpoint.full_state import read_full_state, shape_model
    from model.reward import RewardModel
    from train.sft.preference import collate_reward, encode_pair, to_preference
    from train.sft.records import BadRecord, raw_records

    step_dir = ckpt.resolve(a.checkpoint)
    mc = ckpt.read_model_config(step_dir)
    tok = Tokenizer(os.path.join(step_dir, ckpt.TOKENIZER))
    model = RewardModel(mc)
    state = read_full_state(step_dir, shape_model(mc), with_optimizer=False).model
    from safetensors import safe_open

    with safe_open(os.path.join(step_dir, ckpt.MODEL_FILE), "pt") as f:
        if "value.weight" not in f.keys():
            print(f"score_rewards: {step_dir} has no reward head (value.weight): train one with launch/reward.py",
                  file=sys.stderr)
            return 2
        state["value.weight"] = f.get_tensor("value.weight")
    model.load_state_dict(state, strict=True)
    model.eval()
    counts, pairs, wheres = Counter(), [], []
    for where, rec in raw_records(a.pairs):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            prompt, chosen, rejected = to_preference(rec, where)
        except BadRecord as e:
            counts["skipped_bad"] += 1
            print(f"score_rewards: skipped {e.where}: {e.reason}", file=sys.stderr)
            continue
        pair = encode_pair(tok, prompt, chosen, rejected, (a.max_len or mc.max_seq_len) - 1, counts)
        if pair is not None:
            pairs.append(pair)
            wheres.append(where)
    rewards = []
    with torch.no_grad():
        for lo in range(0, len(pairs), a.batch_size):
            batch = collate_reward(pairs[lo:lo + a.batch_size], max(tok.pad_id, 0))
            r, _ = model(batch["input"], last_index=batch["model_kwargs"]["last_index"], pairs=False)
            n = len(pairs[lo:lo + a.batch_size])
            rewards += list(zip(r[:n].tolist(), r[n:].tolist()))
    if not rewards:
        print(f"score_rewards: no usable pair in {a.pairs} ({dict(counts)})", file=sys.stderr)
        return 2
    correct = sum(c > r for c, r in rewards)
    summary = {"checkpoint": step_dir, "pairs": len(rewards), "accuracy": correct / len(rewards),
               "mean_margin": sum(c - r for c, r in rewards) / len(rewards),
               **dict(counts)}
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            for where, (c, r) in zip(wheres, rewards):
                f.write(json.dumps({"where": where, "reward_chosen": c, "reward_rejected": r}) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
