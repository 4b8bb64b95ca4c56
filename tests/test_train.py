"""`python -m pyengine train`: the origin notes' models learn, match torch.nn, and match under DDP."""
import json

import pytest
import torch

import pyengine.nn as pnn
from pyengine import train

pytest.importorskip("sklearn", reason="the mlp and digits models use scikit-learn's bundled data sets")


def test_linear_model_learns_w_2_b_0(tmp_path):
    out = tmp_path / "linear.json"
    plot = tmp_path / "l.png"
    assert train.main(["--model", "linear", "--compare-torch", "--json", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    assert result["pyengine"]["final_loss"] < 1e-3
    # The loss ends 1e5 below where it starts: its residuals y - t are ~1e-2 of y, so each float32 rounding of y
    # (6e-8) weighs ~100x more in the loss there. Two correct kernels that round differently (torch's BLAS,
    # pyengine's single-pass small-layer kernel) end ~2e-5 apart; a wrong gradient ends orders of magnitude off.
    assert result["max_relative_loss_difference"] < 1e-4
    assert len(result["pyengine"]["loss"]) == 500
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 1000


def test_mlp_matches_torch_step_by_step(tmp_path):
    out = tmp_path / "mlp.json"
    train.main(["--model", "mlp", "--epochs", "15", "--compare-torch", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["max_relative_loss_difference"] < 1e-5
    assert result["pyengine"]["final_loss"] < result["pyengine"]["loss"][0]


def test_digits_reaches_95_percent_held_out(tmp_path):
    out = tmp_path / "digits.json"
    train.main(["--model", "digits", "--epochs", "15", "--json", str(out)])
    assert json.loads(out.read_text())["pyengine"]["accuracy"] >= 0.95


def test_ddp_two_processes_end_with_the_weights_of_one(tmp_path):
    args = train.parse_args(["--model", "mlp", "--epochs", "3", "--batch-size", "33"])  # 33: unequal shards
    torch.manual_seed(0)
    init = train.build_model("mlp", pnn)[0].state_dict()
    curve1, state1, _ = train.train("mlp", pnn, init, args, show=False)
    args.ddp = 2
    curve2, state2, _ = train.train_ddp("mlp", init, args)
    assert len(curve1) == len(curve2)
    torch.testing.assert_close(torch.tensor(curve2), torch.tensor(curve1), rtol=1e-5, atol=1e-6)
    for k in state1:
        torch.testing.assert_close(state2[k], state1[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "digits"])
def test_fused_training_step_matches_torch_step_by_step(tmp_path, model):
    """--fused: FusedMLP.training_step for every mini-batch, against torch.nn's zero_grad / backward / SGD."""
    out = tmp_path / f"{model}.json"
    train.main(["--model", model, "--epochs", "5", "--fused", "--compare-torch", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["fused"] and result["max_relative_loss_difference"] < 1e-5
    assert result["pyengine"]["final_loss"] < result["pyengine"]["loss"][0]


def test_fused_refuses_what_it_cannot_train():
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "linear", "--fused"])
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "mlp", "--fused", "--ddp", "2"])
