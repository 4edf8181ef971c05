"""agents.sb3_ppo: the run folder, resume, and (slow) PPO beating random on the small preset."""

import pytest

from agents import sb3_ppo
from gpr_sim.runs import read_json, read_metrics


def test_short_run_writes_folder_and_resumes(tmp_path):
    common = [
        "--seeds",
        "0",
        "--num-envs",
        "2",
        "--n-steps",
        "64",
        "--batch-size",
        "64",
        "--n-epochs",
        "1",
        "--eval-episodes",
        "3",
        "--eval-every",
        "128",
        "--out",
        str(tmp_path),
    ]
    sb3_ppo.main(common + ["--total-timesteps", "128"])
    run = tmp_path / "ads-v0__sb3_ppo__0"
    assert (run / "checkpoint.zip").exists() and (tmp_path / "learning_curves.png").exists()
    assert read_json(run / "config.json")["seed"] == 0
    first = read_metrics(run / "metrics.jsonl")
    assert [r["global_step"] for r in first] == [128]
    # Asking for more steps continues from the checkpoint instead of starting over.
    sb3_ppo.main(common + ["--total-timesteps", "256"])
    steps = [r["global_step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == [128, 256]
    summary = read_json(tmp_path / "summary.json")
    assert summary["per_seed"][0]["global_step"] == 256


def test_bad_args_are_named(tmp_path):
    with pytest.raises(ValueError, match="total_timesteps=0"):
        sb3_ppo.Args(total_timesteps=0)
    with pytest.raises(ValueError, match="seeds='a,b'"):
        sb3_ppo.Args(seeds="a,b")
    with pytest.raises(ValueError, match="threads=-1"):
        sb3_ppo.Args(threads=-1)


@pytest.mark.slow
def test_ppo_beats_random_on_the_small_preset(tmp_path):
    # Measured 2026-12-05 (commit a20023b + this change) on the 2-core dev box, as this test runs it:
    # the defaults (48k steps, reward normalisation, one torch thread, 300 held-out sessions paired with
    # random on the same users, PPO's stochastic policy sampled with a seeded generator),
    #   python -m agents.sb3_ppo --seeds 0,1,2 --eval-every 48000 --eval-episodes 300 --out /tmp/sb3
    # diff +0.143 [0.081, 0.204], +0.193 [0.135, 0.252], +0.219 [0.138, 0.299] for seeds 0, 1, 2
    # (PPO 0.397 / 0.417 / 0.457 against random 0.254 / 0.224 / 0.239).
    # Why not the 2026-11-23 numbers (+0.071 [0.017, 0.125], +0.137, +0.062): those were measured with
    # two torch threads per process and PPO's argmax action. This test runs one thread (conftest), and the
    # thread count sends training down another trajectory: at that very commit (dd0643a), one thread,
    # seed 0's argmax gave -0.012 [-0.043, 0.019]. And since 2026-12-03 budgets settle by bounded
    # overdelivery (WorldConfig.budget_settlement, c6baa37): in a single session's market an advertiser's
    # daily budget buys about one impression, then it leaves the auction, so an argmax that repeats ads
    # shows nothing after the first (seed 0: 26% distinct ads per session, fill 0.103, diff -0.037
    # [-0.093, 0.019]); random rose from 0.170 to 0.254 (an advertiser whose budget is below one price
    # now serves once instead of never). The sampled policy (92% distinct, fill 0.200) is the one PPO
    # trains, so it is the one evaluated.
    # Asserted: ahead on every seed (the claim), and significantly on at least two (a regression value).
    summary = sb3_ppo.main(
        ["--seeds", "0,1,2", "--eval-every", "48000", "--eval-episodes", "300", "--out", str(tmp_path)]
    )
    assert all(r["eval/diff_vs_random"] > 0 for r in summary["per_seed"]), summary
    assert summary["seeds_beating_random_ci"] >= 2, summary
