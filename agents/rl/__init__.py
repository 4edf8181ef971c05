"""RL on the GPR generator: the rollout buffer (``buffer``), rollouts in ads-v0 (``rollout``), one file per
algorithm (``hepo``, ``ppo``, ``grpo``, ``sibling_grpo``, ``dpo``), their registry (``registry.ALGOS``),
what they share (``common``), the algorithm-agnostic update (``loop``), the data-parallel helpers
(``distributed``), and the run around them: its flags and profiles (``config``), the run itself (``trainer``),
the policy it keeps and when it stops (``selection``) and its resumable state (``checkpoint``); the
learning-rate grid over runs (``sweep``). ``agents.hepo`` is the command line that parses the flags and calls
``trainer.train``; ``agents.sweep`` runs the grid."""
