"""Why one policy's sessions are longer than another's: the true interest match of what each shows, and exits.

    python benchmarks/exit_diagnosis.py --agents learned-cascade:runs/demo/pretrain/platform,gpr:runs/demo/hepo/best \
        --preset small --num-envs 256 --steps 64 --out runs/exit_diagnosis.json

The session-exit hazard rises with the user's fatigue, and an impression tires more the less it matches the user's
interest (``gpr_sim.world.fatigue``): a policy that shows less relevant ads ends sessions sooner and earns fewer
requests per session, which no per-request value (``oracle_share``, the learned reward) sees. Each agent runs
``--steps`` steps from ``reset(--seed)`` on the same market (``agents.evaluate``'s env with its default budgets
and auction, the same users at every slot's first session); per env slot (the unit) it sums the impressions, their
true match (``info["match"]``: the cosine of the user's hidden interest and the ad, a privileged diagnostic read
only here, never by a policy), the requests, the exits (``terminated``) and where the ad slots that showed nothing
went (refused by a budget, or unsold). Printed per agent, with delta-method intervals over slots
(``gpr_sim.stats.ratio_of_means``): the ``RATIOS``; and each agent's paired difference from ``--reference`` (the
first agent by default; slots pair, as their first sessions share users and random streams).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from agents.policies import make_policy
from envs import make_vec_env
from gpr_sim.runs import write_json
from gpr_sim.stats import paired_ratio_difference, ratio_of_means

RATIOS = {
    "match_per_impression": ("match", "impressions"),
    "impressions_per_request": ("impressions", "requests"),
    "exits_per_request": ("exits", "requests"),
    "refused_per_request": ("refused", "requests"),
    "unsold_per_request": ("unsold", "requests"),
}
"""reported ratio -> (numerator, denominator) of the per-slot sums. Where a request's ad slots go: impressions +
refused (won, but the advertiser's budget refused the charge: ``info["budget_capped"]``) + unsold (no winner: too
few eligible candidates above the reserve) = the slots per request."""


def slot_sums(spec: str, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Run ``spec`` for ``args.steps`` steps; per slot (N,) float64 sums of requests, impressions, match, exits,
    refused and unsold ad slots (``RATIOS``)."""
    env = make_vec_env(
        "ads-v0",
        args.num_envs,
        preset=args.preset,
        world_seed=args.world_seed,
        device=args.device,
        validate_actions=False,
    )
    policy = make_policy(spec, env, args.seed)
    obs, _ = env.reset(seed=args.seed)
    n = args.num_envs
    sums = {
        k: torch.zeros(n, dtype=torch.float64, device=args.device)
        for k in ("requests", "impressions", "match", "exits", "refused", "unsold")
    }
    with torch.no_grad():
        for _ in range(args.steps):
            obs, _, terminated, _, info = env.step(policy.act(obs).action)
            imp = info["impression"].bool()  # (N, S)
            shown = imp.sum(1).double()  # (N,)
            refused = info["budget_capped"].double()  # (N,) won slots the budget refused
            sums["requests"] += 1.0
            sums["impressions"] += shown
            sums["match"] += (info["match"].double() * imp).sum(1)
            sums["exits"] += terminated.double()
            sums["refused"] += refused
            sums["unsold"] += imp.shape[1] - shown - refused
    return {k: v.cpu() for k, v in sums.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", required=True, help="comma-separated policy specs (agents.evaluate's)")
    p.add_argument(
        "--reference", default="", help="the agent the others are paired against (default: the first)"
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--steps", type=int, default=64, help="steps per slot (sessions restart as they end)")
    p.add_argument("--seed", type=int, default=54321, help="reset seed (agents.evaluate's --seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON of the table")
    args = p.parse_args(argv)
    agents = [a for a in args.agents.split(",") if a]
    reference = args.reference or (agents[0] if agents else "")
    if not agents or reference not in agents:
        raise SystemExit(f"error: --reference {reference!r} must be one of --agents {agents}")
    if args.num_envs < 2 or args.steps < 1:
        raise SystemExit(
            f"error: --num-envs {args.num_envs} / --steps {args.steps}: need >= 2 slots and >= 1 step"
        )
    sums = {a: slot_sums(a, args) for a in agents}
    rows = []
    for agent in agents:
        s, r = sums[agent], sums[reference]
        row = {"agent": agent}
        for name, (num, den) in RATIOS.items():
            est = ratio_of_means(s[num].numpy(), s[den].numpy())
            row.update({name: est.value, f"{name}_ci_low": est.ci_low, f"{name}_ci_high": est.ci_high})
            if agent != reference:
                d = paired_ratio_difference(s[num].numpy(), s[den].numpy(), r[num].numpy(), r[den].numpy())
                row.update(
                    {
                        f"delta_{name}": d.value,
                        f"delta_{name}_ci_low": d.ci_low,
                        f"delta_{name}_ci_high": d.ci_high,
                    }
                )
        rows.append(row)
    print(
        f"{args.preset}, {args.num_envs} slots x {args.steps} steps, reset seed {args.seed}; 95% intervals over slots"
    )
    for row in rows:
        cells = [
            f"{name} {row[name]:.4f} [{row[f'{name}_ci_low']:.4f}, {row[f'{name}_ci_high']:.4f}]"
            + (
                f" (vs reference {row[f'delta_{name}']:+.4f} [{row[f'delta_{name}_ci_low']:+.4f}, "
                f"{row[f'delta_{name}_ci_high']:+.4f}])"
                if f"delta_{name}" in row
                else ""
            )
            for name in RATIOS
        ]
        print(f"{row['agent']}:\n  " + "\n  ".join(cells))
    result = {"config": vars(args) | {"out": str(args.out)}, "reference": reference, "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
