"""Evaluation of policies in ads-v0: ``agents.evaluate`` is the entry point that compares agents online,
``agents.hepo`` evaluates its generator on held-out sessions while it trains, ``agents.ope`` estimates a policy's
value from a log and checks the estimate against the simulator.

| module | what |
|---|---|
| ``sessions`` | ``collect_sessions``: a policy on a vector env until every slot has its sessions (the one session loop) |
| ``compare`` | ``EvalConfig``, ``compare_agents`` (every agent on the same users, sessions cached by content), ``write_comparison``, the summary table and charts |
| ``paired`` | ``paired_table``: every agent minus a reference, session by session (paired interval, unpaired interval, variance reduction), ``write_paired``, its table and chart |
| ``folder`` | ``evaluate_folder``: a comparison run into an ``agents.evaluate`` folder (owner, lock, ``config.json``, tables, charts, paired table): what the entry point and the notebooks call |
| ``heldout`` | ``HeldOutConfig``, the RL run's ``Evaluator`` (online metrics, Table 5 strata, Table 3 candidates) and ``mtp_candidates`` |
| ``offpolicy`` | off-policy evaluation against the truth: a log re-simulated with the estimators' inputs (``resimulate``, ``check_reproduced``), ``estimate`` (every estimator on the two-action view), the online and bandit truths, the log-size sweep and its plot |
"""
