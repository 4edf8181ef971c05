"""Where trained generators moved probability: the start's own rollout scored under the start and under each of them.

    python benchmarks/path_mass_shift.py runs/dpo/RUN runs/hepo/RUN --out runs/shift -- \
        --env ads-v0 --pretrain-dir runs/demo/pretrain

Online RL only ever scores the paths its current policy samples, so its logs cannot say whether training moved
probability onto better paths or off everything it was shown. This replays one rollout of the RL start (the VAFT
generator of ``--pretrain-dir``, in the run's training market with its learned reward: ``agents.rl.trainer``'s own
``pretrained`` and ``make_roller``, the flags after ``--`` as ``agents.hepo`` takes them) and scores its K sampled
paths per request under the start and under each trained generator. Per generator, over the requests whose group
has a best and a worst path (DPO's pairs, ``agents.rl.dpo.pairs``):

- the mean log pi - log pi_start, summed over levels, of the chosen (best) and the rejected (worst) path and of
  every sampled path;
- the probability each model puts on the start's distinct sampled paths, per request (the start's own is its
  coverage by K samples): what a generator keeps of where the start's mass was.

Both falling together (the chosen path too, and the mass with it) is likelihood displacement: the probability went to
paths the start never sampled. Prints a table; ``--out`` writes OUT.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import parse_args, run_main  # noqa: E402
from agents.policies.gpr import load_run_model  # noqa: E402
from agents.rl.config import ENTRY, PROFILES, RLConfig  # noqa: E402
from agents.rl.dpo import pairs  # noqa: E402
from agents.rl.loop import path_terms  # noqa: E402
from agents.rl.trainer import make_roller, pretrained  # noqa: E402
from gpr_sim.runs import write_json  # noqa: E402
from gpr_sim.tokenizer.metrics import path_keys  # noqa: E402


def distinct_mass(codes: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """(M, K, L) sampled paths and (M, K) their path log-probs -> (M,) the probability on the distinct paths of each
    row (a path drawn twice counted once)."""
    key = path_keys(codes.flatten(0, 1))  # the tokenizer's mixed-radix path key, one int64 per path
    if key is None:
        raise ValueError(f"paths of {codes.shape[2]} levels whose digits' ranges do not fit one int64 key")
    key, order = key.view(codes.shape[:2]).sort(1)
    first = torch.ones_like(key, dtype=torch.bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    return (log_prob.gather(1, order).exp() * first).sum(1)


@torch.no_grad()
def shift(models: dict[str, torch.nn.Module], args: RLConfig, steps: int) -> dict[str, dict[str, float]]:
    """``models`` (name -> generator) scored on ``steps`` rollout steps of the RL start in the market ``args``
    describes -> name -> the module doc's numbers (the start itself under the name ``start``)."""
    vaft, funnel = pretrained(args)
    start, tok = load_run_model(vaft)
    start = start.to(args.device).eval()
    roller = make_roller(args, tok, funnel)
    buf, _ = roller.collect(start, steps)
    valid = buf.valid
    reward, codes = buf.reward[valid], buf.codes[valid]
    rows, best, worst, has = pairs(reward)
    if not bool(has.any()):
        raise ValueError("the start's rollout has no group with a best and a worst path: nothing to compare")

    def path_log_prob(model) -> torch.Tensor:
        model = model.to(args.device).eval()
        return path_terms(model, buf, ad_lookup=roller.ad_lookup(model))[0].sum(-1)[valid]  # (M, K)

    lp_start = path_log_prob(start)
    out = {}
    for name, model in {"start": start, **models}.items():
        lp = lp_start if model is start else path_log_prob(model)
        ratio = lp - lp_start
        out[name] = {
            "requests": int(has.numel()),
            "pairs": float(has.float().mean()),
            "chosen_logratio": float(ratio[rows, best][has].mean()),
            "rejected_logratio": float(ratio[rows, worst][has].mean()),
            "sampled_logratio": float(ratio.mean()),
            "mass_on_start_paths": float(distinct_mass(codes, lp).mean()),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rl = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "runs", nargs="+", help="trained generators: agents.hepo run folders (or any gpr stage folder)"
    )
    p.add_argument(
        "--steps", type=int, default=2, help="rollout steps of the start replayed (all its sessions each)"
    )
    p.add_argument("--out", default="", help="write OUT.json")
    ours = p.parse_args(ours)
    if ours.steps < 1:
        raise ValueError(f"--steps={ours.steps} is invalid: expected >= 1")
    args = parse_args(RLConfig, rl, "", PROFILES, entry=ENTRY)
    models = {str(run): load_run_model(run)[0] for run in ours.runs}
    result = shift(models, args, ours.steps)
    cols = ("chosen_logratio", "rejected_logratio", "sampled_logratio", "mass_on_start_paths")
    print(
        f"the start's rollout: {result['start']['requests']} requests, pairs in {result['start']['pairs']:.3f}"
    )
    print(f"{'generator':50s} " + " ".join(f"{c:>20s}" for c in cols))
    for name, row in result.items():
        print(f"{name[-50:]:50s} " + " ".join(f"{row[c]:>+20.3f}" for c in cols))
    if ours.out:
        write_json(Path(f"{ours.out}.json"), {"command": argv, "shift": result})
    return result


if __name__ == "__main__":
    run_main(main)
