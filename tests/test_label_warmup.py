"""The label warm-up: the label side trained alone, on the class codes, until its round trip
decodes every class at every depth; and the Trainer running it once, before a fresh run."""
import copy

import pytest
import torch

import al_ext
from al_ext import Trainer, bp_baseline
from al_ext.label_side import ZERO_CENTRED
from al_ext.label_warmup import CHECK_EVERY, label_round_trip_decodes, label_side_ready, warm_up_label_side


def deep_sigmoid_mlp(seed=0, **options):
    """Four blocks of NECO's sigmoid label side: at He-normal weights it does not decode."""
    torch.manual_seed(seed)
    return al_ext.ALMLP(20, 6, hidden=(16, 16, 16, 16), label_dim=32, bridge_factor=2, **options)


def x_side(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".f." in k or ".b." in k}


def assert_same_parameters(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_the_warm_up_makes_the_round_trip_decode_and_leaves_f_and_b_alone():
    model = deep_sigmoid_mlp()
    assert label_round_trip_decodes(model) is False
    before = x_side(model)
    steps, ready = warm_up_label_side(model)
    assert ready and label_side_ready(model) and label_round_trip_decodes(model) is True
    assert 0 < steps < 1000 and steps % CHECK_EVERY == 0
    for name, value in x_side(model).items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters()), "no gradient of the warm-up is left behind"
    assert model.training, "the check's eval mode does not outlast it"
    # the round trip is what the full path decodes through: every class comes back at every depth
    t = model.label_targets(torch.arange(6))
    for depth, block in enumerate(model.blocks, start=1):
        t = block.g(t)
        assert torch.equal(model.decode(t, depth).argmax(1), torch.arange(6))


def test_the_warm_up_goes_on_until_no_depth_has_lost_the_classes_separation(monkeypatch):
    decoding_only = deep_sigmoid_mlp()
    monkeypatch.setattr("al_ext.label_warmup.SEPARATION", 0.0)  # the round trip alone
    decodes_after, _ = warm_up_label_side(decoding_only)
    monkeypatch.setattr("al_ext.label_warmup.SEPARATION", 0.75)
    assert label_round_trip_decodes(decoding_only)
    assert not label_side_ready(decoding_only), "when it first decodes, the deepest codes are still close together"
    ready_after, ready = warm_up_label_side(deep_sigmoid_mlp())
    assert ready and ready_after > decodes_after


def test_the_warm_up_is_deterministic_and_stops_at_once_where_there_is_nothing_to_do():
    a, b = deep_sigmoid_mlp(), deep_sigmoid_mlp()
    assert warm_up_label_side(a) == warm_up_label_side(b)
    assert_same_parameters(a, b)
    state = copy.deepcopy(a.state_dict())
    assert warm_up_label_side(a) == (0, True)
    for name, value in a.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("first_ae_loss", ["mse", "cross_entropy"])
def test_the_warm_up_takes_every_label_side(first_ae_loss):
    for options in ({"first_ae_loss": first_ae_loss}, {"label_side": ZERO_CENTRED, "first_ae_loss": first_ae_loss}):
        model = deep_sigmoid_mlp(**options)
        assert warm_up_label_side(model)[1], options


@pytest.mark.parametrize("label_dim", [8, 32, 256])
def test_the_rate_follows_the_label_width_so_that_narrow_and_wide_label_sides_get_ready_alike(label_dim):
    torch.manual_seed(0)
    model = al_ext.ALMLP(12, 3, hidden=(16, 16, 16, 16), label_dim=label_dim, bridge_factor=2)
    steps, ready = warm_up_label_side(model)
    assert ready and steps <= 400, steps  # at Adam's 1e-3 a label side 8 wide needs 1500-2000


def test_a_warm_up_that_runs_out_of_steps_says_so():
    model = deep_sigmoid_mlp()
    assert warm_up_label_side(model, lr=1e-9, max_steps=15) == (15, False)


def test_bad_warm_up_arguments():
    with pytest.raises(TypeError, match="model must be an al_ext.AssociatedLearning"):
        warm_up_label_side(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        warm_up_label_side(deep_sigmoid_mlp(), max_steps=0)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        warm_up_label_side(deep_sigmoid_mlp(), lr=float("nan"))
    with torch.device("meta"):
        meta = al_ext.ALMLP(20, 6, hidden=(16,), label_dim=8, bridge_factor=2)
    assert label_round_trip_decodes(meta) is None
    with pytest.raises(ValueError, match="every block's label side in this process"):
        warm_up_label_side(meta)


# ---- in the Trainer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 20, generator=g)
    return (x, x[:, :6].argmax(1)), (x[:48], x[:48, :6].argmax(1))


def trainer(model=None, **options):
    return Trainer(deep_sigmoid_mlp() if model is None else model, lr=1e-3, batch_size=64, progress=False, **options)


def test_the_trainer_warms_up_a_fresh_run_once(data):
    train, val = data
    expected = deep_sigmoid_mlp()
    steps, _ = warm_up_label_side(expected)
    run = trainer()
    assert run.label_warmup
    before = x_side(run.model)
    run.fit(train, val, epochs=1)
    first = run.history[0]
    assert first["label_warmup_steps"] == steps and first["label_warmup_time_s"] > 0
    assert run.label_warmup_result == {k: first[k] for k in ("label_warmup_steps", "label_warmup_time_s")}
    assert label_round_trip_decodes(run.model)
    assert any(not torch.equal(v, before[k]) for k, v in x_side(run.model).items()), "training went on from there"
    run.fit(train, val, epochs=2)  # continuing: no second warm-up
    assert run.label_warmup_result["label_warmup_steps"] == steps and "label_warmup_steps" not in run.history[1]


def test_the_trainers_warm_up_is_the_function_then_plain_training(data):
    train, _ = data
    warmed_by_hand = deep_sigmoid_mlp()
    warm_up_label_side(warmed_by_hand)
    by_hand, by_trainer = trainer(warmed_by_hand, label_warmup=False), trainer()
    by_hand.fit(train, epochs=1)
    by_trainer.fit(train, epochs=1)
    assert_same_parameters(by_hand.model, by_trainer.model)
    assert "label_warmup_steps" not in by_hand.history[0] and by_hand.label_warmup_result is None


def test_a_run_that_has_stepped_or_loaded_is_not_warmed_up(data, tmp_path):
    train, _ = data
    stepped, plain = trainer(), trainer(label_warmup=False)
    stepped.step(*train)
    plain.step(*train)
    assert_same_parameters(stepped.model, plain.model)  # step() is one update, no warm-up
    stepped.fit(train, epochs=1)
    plain.fit(train, epochs=1)
    assert_same_parameters(stepped.model, plain.model)
    assert stepped.label_warmup_result is None

    whole = trainer()
    whole.fit(train, epochs=2)
    interrupted = trainer()
    interrupted.fit(train, epochs=1, checkpoint=tmp_path / "run.pt")
    resumed = trainer(deep_sigmoid_mlp(seed=5))
    resumed.load(tmp_path / "run.pt")
    assert resumed.label_warmup_result == interrupted.label_warmup_result
    resumed.fit(train, epochs=2)
    assert_same_parameters(whole.model, resumed.model)
    assert resumed.history[0]["label_warmup_steps"] == whole.history[0]["label_warmup_steps"]


def test_the_trainer_says_when_the_warm_up_runs_out_or_cannot_run(data, monkeypatch):
    train, _ = data
    monkeypatch.setattr("al_ext.label_warmup.MAX_STEPS", 1)
    run = trainer()
    with pytest.warns(RuntimeWarning, match="the label warm-up stopped after 1 steps.*label_warmup=False"):
        run.fit(train, epochs=1)
    assert run.history[0]["label_warmup_steps"] == 1
    # a distributed run whose blocks were placed before fit: the other stages' are on the meta device
    with monkeypatch.context() as patched:
        patched.setattr("al_ext.label_warmup.holds_meta_parameters", lambda model: True)
        placed = trainer()
        with pytest.warns(RuntimeWarning, match="starts without the label warm-up: .*on the meta device"):
            placed.fit(train, epochs=1)
        assert placed.label_warmup_result is None and "label_warmup_steps" not in placed.history[0]
    # float16 parameters: Adam's state underflows (NaN at eps 1e-8; never ready above it)
    half = trainer(al_ext.ALMLP(train[0].shape[1], 10, hidden=(32, 32), label_dim=16).half())
    with pytest.raises(ValueError, match="cannot run: its Adam state underflows in float16"):
        al_ext.label_warmup.warm_up_label_side(half.model)
    with pytest.warns(RuntimeWarning, match="starts without the label warm-up: .*float16"):
        half.fit((train[0].half(), train[1]), epochs=1)
    assert half.label_warmup_result is None


def test_a_non_finite_loss_in_the_warm_up_stops_it(data):
    model = deep_sigmoid_mlp()
    with torch.no_grad():
        model.blocks[2].g[0].weight[0, 0] = float("nan")
    block_3 = {k: v.clone() for k, v in model.blocks[2].state_dict().items()}
    with pytest.raises(al_ext.NonFiniteLossError, match="non-finite loss L_ae = nan in block 3.*in the label warm-up"):
        trainer(model).fit(data[0], epochs=1)
    for name, value in model.blocks[2].state_dict().items():
        torch.testing.assert_close(value, block_3[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_bad_label_warmup():
    with pytest.raises(TypeError, match="label_warmup must be True, False or None"):
        Trainer(deep_sigmoid_mlp(), label_warmup=1, progress=False)
    with pytest.raises(ValueError, match="label_warmup=True trains an AL model's label side"):
        Trainer(bp_baseline(deep_sigmoid_mlp()), label_warmup=True, progress=False)
    assert not Trainer(bp_baseline(deep_sigmoid_mlp()), progress=False).label_warmup
