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


@pytest.mark.slow
def test_ppo_beats_random_on_the_small_preset(tmp_path):
    # Measured 2026-11-23 with the defaults (48k steps, reward normalisation, 300 held-out sessions
    # paired with random on the same users): diff +0.071 [0.017, 0.125], +0.137 [0.053, 0.221],
    # +0.062 [-0.006, 0.131] for seeds 0, 1, 2. Asserted: ahead on every seed (the claim), and significantly
    # on two (a regression value of those seeds: seed 2's interval reaches below 0).
    summary = sb3_ppo.main(
        ["--seeds", "0,1,2", "--eval-every", "48000", "--eval-episodes", "300", "--out", str(tmp_path)]
    )
    assert all(r["eval/diff_vs_random"] > 0 for r in summary["per_seed"]), summary
    assert summary["seeds_beating_random_ci"] >= 2, summary
