"""``--init`` from a checkpoint written before a zero-initialised width (``ZERO_INIT_WIDTHS``: an MTP model
without the HTE's candidate-ad features) loads it exactly; any other config difference still errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from agents import pretrain
from agents.pretraining.checkpoint import checkpoint_data, load_checkpoint, load_init, read_checkpoint
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.platform.features import AD_FEATURE_DIM
from gpr_sim.runs import read_metrics
from gpr_sim.schema import TokenBatch

OLD = GPRConfig(level_sizes=(4, 4, 3), d_model=16, n_layers=1, n_heads=2, dense_dim=5, max_len=16)
NEW = dataclasses.replace(OLD, hte_ad_features=AD_FEATURE_DIM)


def _tokens(b: int, t: int = 6) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    return TokenBatch(
        token_ids=torch.randint(0, 9, (b, t), generator=g),
        type_ids=torch.tensor([0, 1, 1, 3, 3, 2]).expand(b, t).clone(),
        positions=torch.arange(t).expand(b, t).clone(),
        padding_mask=torch.zeros(b, t, dtype=torch.bool),
        semantic_codes=torch.randint(0, 3, (b, t, OLD.path_len), generator=g),
        event_ids=torch.randint(0, 4, (b, t), generator=g),
        dense_features=torch.randn(b, t, OLD.dense_dim, generator=g),
    )


def _save(tmp_path, cfg: GPRConfig, seed: int = 0):
    """A trained-looking model of ``cfg`` (every weight random, none at its init) and its checkpoint file."""
    torch.manual_seed(seed)
    model = GPRModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / f"ckpt_{seed}.pt"
    payload = checkpoint_data(model, opt, torch.Generator().manual_seed(0), 7, "mtp")
    path.write_bytes(payload)
    return model.eval(), path


def _outputs(model: GPRModel, feats: torch.Tensor | None):
    """Step-0 outputs a VAFT run reads: the MTP loss terms, the contexts' level log-probs and path values."""
    tokens = _tokens(3)
    targets = torch.randint(
        0, 3, (3, OLD.mtp_heads, OLD.path_len), generator=torch.Generator().manual_seed(2)
    )
    g = torch.tensor([1.0, -2.0, 0.5])
    kw = {} if feats is None else {"value_features": feats[:, 0]}
    with torch.no_grad():
        out = model.mtp_loss(
            tokens, targets, value_target=g, generator=torch.Generator().manual_seed(1), **kw
        )
        ctx = torch.randn(3, 5, OLD.d_model, generator=torch.Generator().manual_seed(3))
        paths = targets[:, :2]
        values = model.path_values(ctx, paths, None if feats is None else feats[:, :2])
        logp = model.log_prob(ctx, paths[:, 0])
    return out.loss, out.loss_value, values, logp


def test_old_checkpoint_loads_exactly_with_the_features_on(tmp_path):
    old, path = _save(tmp_path, OLD)
    stored = torch.load(path, weights_only=True)
    del stored["config"]["hte_ad_features"]  # as written before the field existed
    torch.save(stored, path)
    torch.manual_seed(1)
    new = GPRModel(NEW)
    with torch.no_grad():
        new.hte.ad_proj.weight.normal_()  # the loader must zero it, not rely on the fresh init
    assert load_init(path, new) == ["hte_ad_features"]
    new.eval()
    assert torch.equal(new.hte.ad_proj.weight, torch.zeros_like(new.hte.ad_proj.weight))
    feats = torch.randn(3, 4, AD_FEATURE_DIM, generator=torch.Generator().manual_seed(4))
    for a, b in zip(_outputs(old, None), _outputs(new, feats), strict=True):
        assert torch.equal(a, b)
    # every weight the old model has is the checkpoint's, bit for bit
    new_state = new.state_dict()
    for k, v in old.state_dict().items():
        assert torch.equal(new_state[k], v), k


def test_same_config_loads_as_before_and_resume_stays_strict(tmp_path):
    old, path = _save(tmp_path, OLD)
    model = GPRModel(OLD)
    assert load_init(path, model) == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))
    # a resumed run's own checkpoint must match its config exactly: no widening there
    with pytest.raises(ValueError, match=r"differs from this run's in \['hte_ad_features'\]"):
        load_checkpoint(path, NEW)


@pytest.mark.parametrize(
    ("saved", "model_cfg", "field"),
    [
        (OLD, dataclasses.replace(NEW, d_model=32), "d_model"),  # another width besides the new one
        (OLD, dataclasses.replace(OLD, d_model=32), "d_model"),  # only another width
        (NEW, OLD, "hte_ad_features"),  # the checkpoint has the features, the model does not
        (dataclasses.replace(OLD, hte=False), NEW, "hte"),  # a zero width beside another difference
    ],
)
def test_other_differences_still_error(tmp_path, saved, model_cfg, field):
    _, path = _save(tmp_path, saved)
    model = GPRModel(model_cfg)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"ckpt_0\.pt: checkpoint model config differs .*'{field}'"):
        load_init(path, model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # untouched


def test_narrower_feature_width_errors(tmp_path):
    # a checkpoint with the features at another width is not "without them": its weights would not fit
    _, path = _save(tmp_path, dataclasses.replace(OLD, hte_ad_features=3))
    with pytest.raises(ValueError, match="hte_ad_features"):
        load_init(path, GPRModel(NEW))


FAST = "--collect-envs 32 --collect-steps 40 --d-model 32 --n-layers 1 --batch-size 64 --threads 1 --no-progress".split()


def test_vaft_cli_starts_from_an_mtp_run_without_the_features(tmp_path, capsys):
    """``python -m agents.pretrain --stage vaft --init OLD/checkpoint.pt`` with the features on (the default)
    from an MTP run without them: one line says so, and step 0 ranks exactly as the MTP run's last step."""
    src = tmp_path / "mtp"
    pretrain.main(["--out", str(src), "--steps", "20", "--eval-every", "20", "--no-hte-ad-features", *FAST])
    assert read_checkpoint(src / "checkpoint.pt")["config"]["hte_ad_features"] == 0
    common = ["--logs", str(src / "logs.parquet"), "--tokenizer", str(src / "tokenizer"), *FAST[4:]]
    init = ["--stage", "vaft", "--init", str(src / "checkpoint.pt"), "--steps", "2", "--eval-every", "2"]
    capsys.readouterr()
    pretrain.main(["--out", str(tmp_path / "vaft"), *init, *common])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "predates" in ln]
    assert lines == [
        f"--init {src / 'checkpoint.pt'}: the checkpoint predates ['hte_ad_features']: loaded with "
        "their weights at zero (same outputs)"
    ]
    assert read_checkpoint(tmp_path / "vaft" / "checkpoint.pt")["config"]["hte_ad_features"] == AD_FEATURE_DIM
    vaft, mtp = read_metrics(tmp_path / "vaft" / "metrics.jsonl"), read_metrics(src / "metrics.jsonl")
    for key in ("eval/hitrate@10", "eval/ndcg@10"):
        assert vaft[0][key] == mtp[-1][key]
    with pytest.raises(ValueError, match=r"checkpoint\.pt: checkpoint model config differs .*'d_model'"):
        pretrain.main(["--out", str(tmp_path / "wide"), *init, *common, "--d-model", "16"])
