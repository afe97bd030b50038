"""On-policy RLHF (PPO, GRPO): losses and advantages (``losses``), batched rollouts with
sampling-time log-probs and response masks (``rollout``), rewards (``rewards``) and the
rollout / optimisation loop (``loop``)."""
