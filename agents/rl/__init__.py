"""RL on the GPR generator: the rollout buffer (``buffer``), rollouts in ads-v0 (``rollout``), one file per
algorithm (``hepo``, ``ppo``, ``grpo``, ``sibling_grpo``, ``dpo``), their registry (``registry.ALGOS``),
what they share (``common``), the algorithm-agnostic training loop (``loop``) and the data-parallel
helpers (``distributed``). ``agents.hepo`` is the entry point that runs them."""
