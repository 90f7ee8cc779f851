"""Inputs a user gets wrong, or gets right in a way the happy path did not try: each is
refused with a message naming what was expected, or works as a PyTorch user would expect,
on every training path (not only through the Trainer)."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import al_ext
from al_ext import Trainer, data, memory_format, presets, text
from al_ext.label_side import LabelSide
from al_ext.models import ALCNN, VGG_AL, ResNet_AL, Transformer_AL

from conftest import small_mlp


def batch(n=12, features=20, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=generator), torch.randint(0, classes, (n,), generator=generator)


@pytest.mark.parametrize("options", [{}, {"pipeline": True}, {"backend": "reference"}])
def test_an_mlp_trains_on_inputs_of_any_shape_holding_its_features(options):
    # ALMLP flattens (N, ...) on every path; the fused step skipped the nn.Flatten and refused (N, 4, 5).
    x, y = batch()
    flat, shaped = (Trainer(small_mlp(backend=options.get("backend", "auto")), progress=False, label_warmup=False,
                            pipeline=options.get("pipeline", False)) for _ in range(2))
    flat.fit((x, y), epochs=1)
    shaped.fit((x.reshape(12, 4, 5), y), epochs=1)
    for a, b in zip(flat.model.parameters(), shaped.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_image_models_take_their_layout_or_flat_data_only():
    model = ALCNN((3, 8, 8), 3, channels=[(2, 2)], strides=[1], label_dim=4).eval()
    images = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(model(images), model(images.flatten(1)))
    for wrong in (images.permute(0, 2, 3, 1), images.reshape(4, 2, 96)):  # HWC images would be read as noise
        with pytest.raises(ValueError, match=r"x must be images \(N, 3, 8, 8\), or flat \(N, 192\), got shape"):
            model(wrong)
    grey = ALCNN((1, 8, 8), 3, channels=[(2, 2)], strides=[1], label_dim=4).eval()
    torch.testing.assert_close(grey(torch.ones(2, 8, 8)), grey(torch.ones(2, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\) or \(N, 8, 8\), or flat \(N, 64\)"):
        grey(torch.ones(2, 8, 8, 1))
    with pytest.raises(ValueError, match="x must be images"):
        al_ext.bp_baseline(model)(images.permute(0, 2, 3, 1))


@pytest.mark.parametrize("path", ["engine", "fused engine", "pipeline", "local_losses"])
@pytest.mark.parametrize("labels,error,message", [
    (torch.tensor([1]), ValueError, r"y must have one label per sample \(12\), got 1"),
    (torch.zeros(12, 1, dtype=torch.long), ValueError, "y must be 1-D"),
    (torch.full((12,), 5), ValueError, r"y must lie in \[0, 5\), got values from 5 to 5"),
    (torch.zeros(12), TypeError, "y must hold integer class labels"),
])
def test_labels_are_checked_on_every_training_path(path, labels, error, message):
    # A wrong label shape used to broadcast against the targets and train on garbage.
    model = small_mlp(backend="fused" if path == "fused engine" else "reference")
    engine = al_ext.make_engine(model, "adam", 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x, _ = batch()
    run = {"engine": lambda: engine.step(x, labels), "fused engine": lambda: engine.step(x, labels),
           "local_losses": lambda: model.local_losses(x, labels),
           "pipeline": lambda: al_ext.Pipeline(model, engine.optimizers).run([(x, labels)])}[path]
    with pytest.raises((error, al_ext.PipelineError), match=message):
        run()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    engine.step(x, torch.randint(0, 5, (12,), dtype=torch.int32))  # any integer dtype is fine


def test_building_a_batch_norm_model_leaves_its_statistics_alone():
    for model in (ResNet_AL(8, (3, 8, 8), 3, widths=[2, 2, 2], label_dim=4),
                  VGG_AL((3, 8, 8), 3, stages=[(2,)], batch_norm=True, head=[4], label_dim=4)):
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            assert int(norm.num_batches_tracked) == 0
            assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert all(m.training for m in model.modules())
    ResNet_AL(8, (3, 4, 4), 3, widths=[2, 2, 2])  # a 1 x 1 map of the dummy sample is legal in eval mode


def test_predict_runs_in_eval_mode_and_puts_every_module_back():
    model = ResNet_AL(8, (3, 8, 8), 3, widths=[2, 2, 2], label_dim=4)
    model.blocks[0].f[-1].eval()  # a user's own choice of mode for one module survives
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.rand(5, 3, 8, 8)
    model.predict(x), model.predict_adaptive(x, 0.5), al_ext.bp_baseline(model).predict(x)
    assert int(norm.num_batches_tracked) == 0
    assert model.training and not model.blocks[0].f[-1].training
    text_model = Transformer_AL(50, 3, preset="iclr22", dim=16, heads=2, feedforward=16, label_dim=8)  # dropout 0.1
    dropout_modes = []
    for dropout in (m for m in text_model.modules() if isinstance(m, nn.Dropout)):
        dropout.register_forward_pre_hook(lambda module, inputs: dropout_modes.append(module.training))
    text_model.predict(torch.randint(1, 50, (6, 9)))
    assert dropout_modes and not any(dropout_modes) and text_model.training


def test_auto_backend_falls_back_where_the_fused_step_refuses_the_loss():
    model = small_mlp(first_ae_loss="cross_entropy", label_side=LabelSide(first_decoder_activation="sigmoid"))
    assert not model.uses_fused_step()
    assert "cross-entropy" in model.fused_block_problem()
    Trainer(model, progress=False, label_warmup=False).fit(batch(), epochs=1)


def test_a_checkpoint_loads_only_into_the_optimiser_it_was_trained_with(tmp_path):
    trainer = Trainer(small_mlp(), progress=False, label_warmup=False)
    trainer.fit(batch(), epochs=1)
    trainer.save(tmp_path / "adam.pt")
    for options, kind in (({"optimizer": "sgd"}, "SGD"), ({"optimizer": "sgd", "pipeline": True}, "SGD"),
                          ({"optimizer": "adamw"}, "AdamW")):  # AdamW would take Adam's settings: no decay
        with pytest.raises(ValueError, match=f"holds Adam optimiser states; this engine trains with {kind}"):
            Trainer(small_mlp(), progress=False, **options).load(tmp_path / "adam.pt")
    Trainer(small_mlp(), progress=False, pipeline=True).load(tmp_path / "adam.pt")  # the pipelined fused step


def test_resuming_mid_epoch_needs_the_batch_size_it_stopped_with(tmp_path):
    x, y = batch(n=40)

    class StopAfterTwoBatches:
        def on_step(self, trainer, record):
            trainer.should_stop = trainer.position == 2

    trainer = Trainer(small_mlp(), batch_size=8, progress=False, label_warmup=False, callbacks=[StopAfterTwoBatches()])
    trainer.fit((x, y), epochs=1, checkpoint=tmp_path / "mid.pt")
    assert trainer.position == 2
    resumed = Trainer(small_mlp(), batch_size=16, progress=False)
    resumed.load(tmp_path / "mid.pt")
    with pytest.raises(ValueError, match="stopped after batch 2 of an epoch of batches of 8; resume it with batch_size=8"):
        resumed.fit((x, y), epochs=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    resumed.fit(loader, epochs=1)  # a DataLoader makes its own batches: no size to match


def test_files_a_fit_writes_are_checked_before_it_trains(tmp_path):
    trainer = Trainer(small_mlp(), progress=False)
    for option in ("checkpoint", "save_best"):
        with pytest.raises(ValueError, match=f"{option}: the folder .*does not exist"):
            trainer.fit(batch(), batch(seed=1), epochs=1, **{option: tmp_path / "missing" / "file.pt"})
    with pytest.raises(ValueError, match="save_best needs val="):
        trainer.fit(batch(), epochs=1, save_best=tmp_path / "best.pt")
    assert trainer.epoch == 0 and trainer.global_step == 0


def test_a_custom_model_gets_its_inputs_in_their_own_shape():
    # in_features is a per-sample count: a model of one's own whose f takes images gets images
    class ConvAL(al_ext.AssociatedLearning):
        def __init__(self):
            block = al_ext.ALBlock(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()), nn.Linear(3, 4),
                                   nn.Linear(32, 4), nn.Linear(4, 3))
            super().__init__([block], 3, backend="reference")
            self.in_features = 16

    model = ConvAL()
    x = torch.rand(5, 1, 4, 4)
    assert model(x).shape == (5, 3)
    Trainer(model, progress=False, label_warmup=False).fit((x, torch.randint(0, 3, (5,))), epochs=1)


def test_inputs_are_checked_as_the_model_gets_them():
    x, y = batch()
    x = x.double()
    x[0, 0] = 1e39  # finite in float64, inf in the model's float32
    with pytest.raises(ValueError, match="train inputs contains 1 NaN or infinite value"):
        Trainer(small_mlp(), progress=False).fit((x, y), epochs=1)


@pytest.mark.parametrize("build,message", [
    (lambda: ALCNN((1, 8, 8), 3, channels=[(2, 2)], strides=[0]), r"strides\[0\] must be a positive integer"),
    (lambda: ALCNN((1, 8, 8), 3, channels=[(2.0, 2)], strides=[1]), r"channels\[0\]\[0\] must be a positive integer"),
    (lambda: ALCNN((1, 4.0, 4), 3), "in_shape must be .* three positive integers"),
    (lambda: VGG_AL((3, 8, 8), 3, stages=[(0,)]), r"stages\[0\]\[0\] \(a convolution width, or 'M'"),
    (lambda: VGG_AL((3, 8, 8), 3, stages=[("x",)]), r"stages\[0\]\[0\] .* got 'x'"),
    (lambda: ResNet_AL(8, (3, 8, 8), 3, widths=[]), "widths must list at least one width"),
    (lambda: ResNet_AL(8, (3, 8, 8), 3, widths=[0, 2, 2]), r"widths\[0\] must be a positive integer"),
    # a width where a list of them belongs, or a flat list where pairs or stages belong
    (lambda: small_mlp(hidden=8), "hidden must be a list or tuple of widths"),
    (lambda: al_ext.models.LSTM_AL(20, 3, hidden=8), "hidden must be a list or tuple of LSTM widths"),
    (lambda: ResNet_AL(8, (3, 8, 8), 3, widths=4), "widths must be a list or tuple of stage widths"),
    (lambda: ALCNN((1, 8, 8), 3, channels=2, strides=[1]), "channels must be a list or tuple of"),
    (lambda: ALCNN((1, 8, 8), 3, channels=[(2, 2)], strides=1), "strides must be a list or tuple of"),
    (lambda: ALCNN((1, 8, 8), 3, channels=[(2,)], strides=[1]), r"channels\[0\] must be a pair"),
    (lambda: ALCNN((1, 8, 8), 3, channels=[(2, 2)]), "one entry per block, got 1 and 4 .*pass strides= too"),
    (lambda: ALCNN(28, 3), "in_shape must be a list or tuple"),
    (lambda: VGG_AL((3, 8, 8), 3, stages=[4, 8]), r"stages\[0\] must be a list or tuple of convolution widths"),
    (lambda: VGG_AL((3, 8, 8), 3, stages=[(4,)], head=8), "head must be a list or tuple of dense layer widths"),
    (lambda: Transformer_AL(20, 3, feedforward=0), "feedforward must be a positive integer"),
    (lambda: Transformer_AL(20, 3, dim=4.0, heads=2), "dim must be a positive integer"),
    (lambda: Transformer_AL(20, 3, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    (lambda: text.Vocabulary(["a b c"], max_size=2), "max_size must be at least 3"),
    (lambda: Trainer(small_mlp(), seed="a"), "seed must be an integer"),
    (lambda: Trainer(small_mlp(), callbacks=al_ext.callbacks.Callback()), "callbacks must be a list"),
    (lambda: data.split_dataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]).numpy()), "y must be a torch.Tensor"),
])
def test_bad_model_and_setting_arguments_name_themselves(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_a_split_that_leaves_a_class_untrained_says_so():
    labels = torch.tensor([0] + [1] + [2] * 8)
    with pytest.warns(UserWarning, match=r"class\(es\) \[0\] get no training sample"):
        split = data.stratified_split(labels, val=3, test=5)
    assert 0 not in labels[split.train].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.stratified_split(labels, val=1, test=1)


def test_a_schedule_may_reach_a_learning_rate_of_zero_on_the_fused_step():
    # LinearLR to 0, CosineAnnealingLR's end, a warm-up from 0: torch's optimisers take lr = 0, so the fused op does
    x, y = batch(n=48)
    for pipeline in (False, True):
        trainer = Trainer(small_mlp(), batch_size=16, progress=False, label_warmup=False, pipeline=pipeline,
                          scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.step(x[:16], y[:16])  # at lr 0: nothing moves
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        trainer.fit((x, y), epochs=1)


def test_a_second_run_while_a_stream_is_open_is_refused():
    model = small_mlp(backend="reference")
    pipeline = al_ext.Pipeline(model, al_ext.make_engine(model, "adam", 1e-3).optimizers)
    batches = [batch(seed=i) for i in range(40)]
    stream = pipeline.train(iter(batches))
    next(stream)  # left open: its run waits for the reader
    with pytest.raises(RuntimeError, match="a pipeline run is still training this model"):
        pipeline.run(batches[:2])
    with pytest.raises(RuntimeError, match="still training this model"):
        al_ext.Pipeline(model, pipeline._optimizers).run(batches[:2])  # another Pipeline of the same model
    stream.close()
    assert len(pipeline.run(batches[:3]).losses) == 3


def test_a_pipeline_takes_the_models_own_optimisers_and_schedulers_in_order():
    model, other = small_mlp(backend="reference"), small_mlp(backend="reference")
    opts = al_ext.make_engine(model, "adam", 1e-3).optimizers
    with pytest.raises(ValueError, match=r"optimizers\[0\] must hold exactly block 1's f and b parameters"):
        al_ext.Pipeline(other, opts)
    with pytest.raises(ValueError, match=r"optimizers\[0\] must hold exactly block 1's f and b"):
        al_ext.Pipeline(model, [opts[1], opts[0], *opts[2:]])  # (g, h) at (f, b)'s rate
    with pytest.raises(ValueError, match=r"schedulers\[1\] must step optimizers\[1\]"):
        al_ext.Pipeline(model, opts, schedulers=[torch.optim.lr_scheduler.StepLR(opts[0], 1) for _ in opts])
    with pytest.raises(TypeError, match="pipelined must be True or False, got 'no'"):
        al_ext.Pipeline(model, opts, pipelined="no")
    fused = small_mlp()
    with pytest.raises(ValueError, match=r"optimizers\[1\] must hold exactly block 2's f, b, g and h"):
        al_ext.Pipeline(fused, [al_ext.make_engine(fused, "adam", 1e-3).optimizers[0]] * 2)


@pytest.mark.parametrize("h_width,b_width,message", [
    (1, 5, r"block 1: the decoder h's output has shape \(\d+, 1\), its target, the block's label input, \(\d+, 3\)"),
    (3, 2, r"block 1: the bridge b's output has shape \(16, 2\), the label encoder g's \(16, 5\)"),
])
def test_a_hand_built_block_whose_widths_disagree_is_refused(h_width, b_width, message):
    # an MSE of two shapes broadcasts them, and trained on garbage
    block = al_ext.ALBlock(nn.Sequential(nn.Linear(20, 8), nn.ELU()), nn.Sequential(nn.Linear(3, 5), nn.Sigmoid()),
                           nn.Sequential(nn.Linear(8, b_width), nn.Sigmoid()), nn.Linear(5, h_width))
    x, y = batch(n=16, classes=3)
    with pytest.raises(ValueError, match=message):
        Trainer(al_ext.AssociatedLearning([block], 3), progress=False).fit((x, y), epochs=1)


def test_the_reference_refuses_names_it_does_not_know():
    block = small_mlp(backend="reference").blocks[0]
    x, y = batch()
    t = torch.nn.functional.one_hot(y, 5).float()
    with pytest.raises(ValueError, match="ae_loss must be one of 'mse', 'cross_entropy', got 'MSE'"):
        al_ext.reference.local_losses(block, x, t, "A", "MSE")
    with pytest.raises(ValueError, match="variant must be one of 'A', 'B', got 'a'"):
        al_ext.reference.local_losses(block, x, t, "a")
    params, _, _ = al_ext.fused.dense_block_layout(block)
    with pytest.raises(ValueError, match="x_activation must be one of"):
        al_ext.reference.dense_block_step(x, t, params, x_activation="gelu")


def test_a_fused_optimiser_takes_over_only_what_it_can_keep():
    block = small_mlp().blocks[0]
    fb_params, gh_params = [*block.f.parameters(), *block.b.parameters()], [*block.g.parameters(), *block.h.parameters()]
    gh = torch.optim.Adam(gh_params, lr=2e-3)
    two_rates = torch.optim.Adam([{"params": list(block.f.parameters()), "lr": 0.5},
                                  {"params": list(block.b.parameters()), "lr": 1e-3}])
    with pytest.raises(ValueError, match="fb's parameter groups differ in their settings"):
        al_ext.fused.fused_block_optimizer(block, two_rates, gh, "A", "mse")
    with pytest.raises(ValueError, match="fb must be over the block's f and b parameters exactly"):
        al_ext.fused.fused_block_optimizer(block, torch.optim.Adam(gh_params), gh, "A", "mse")
    stepped = torch.optim.Adam(fb_params, lr=1e-3)
    for p in fb_params:
        p.grad = torch.zeros_like(p)
    stepped.step()
    with pytest.raises(ValueError, match="fb has stepped already"):
        al_ext.fused.fused_block_optimizer(block, stepped, gh, "A", "mse")


def test_a_step_count_that_requires_grad_is_taken_as_a_count():
    block = small_mlp().blocks[0]
    params, _, _ = al_ext.fused.dense_block_layout(block)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    step = torch.tensor(0.0, requires_grad=True)
    x, y = batch()
    al_ext.fused.dense_block_adam_step_(x, torch.nn.functional.one_hot(y, 5).float(), params, *state, step, 1e-3, 2e-3)
    assert step.item() == 1.0


def test_text_readers_refuse_what_they_would_misread(tmp_path):
    with pytest.raises(TypeError, match=r"texts must be an iterable \(a list\) of strings, got str"):
        text.Vocabulary("the cat sat")  # one string: every character a text
    vocabulary = text.Vocabulary(["the cat sat"])
    with pytest.raises(TypeError, match=r"texts must be an iterable \(a list\) of strings, got str"):
        vocabulary.encode("the dog", 3)
    (tmp_path / "bom.csv").write_text('"1","a title","a text"\n', encoding="utf-8-sig")
    assert text.load_ag_news(tmp_path / "bom.csv")[0] == ["a title. a text"]
    (tmp_path / "latin1.csv").write_bytes(b'"1","caf\xe9","x"\n')
    with pytest.raises(ValueError, match="latin1.csv, after row 0: not a UTF-8 CSV file"):
        text.load_ag_news(tmp_path / "latin1.csv")
    (tmp_path / "four.csv").write_text('"1","t","d","extra"\n')
    with pytest.raises(ValueError, match=r"row 1: expected class index 1-4, title, description \(3 fields\); got 4 field\(s\)"):
        text.load_ag_news(tmp_path / "four.csv")


def test_the_fused_ops_refuse_shared_memory_zero_widths_and_stray_devices():
    block = small_mlp().blocks[0]
    params = [p.detach() for p in al_ext.fused.dense_block_layout(block)[0]]
    x, y = batch()
    t = torch.nn.functional.one_hot(y, 5).float()
    state = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match=r"exp_avg\[0\] and exp_avg_sq\[0\] share memory"):
        al_ext.fused.dense_block_adam_step_(x, t, params, state, state, 1, 1e-3, 2e-3)
    with pytest.raises(ValueError, match=r"W_f and momentum_buffer\[0\] share memory"):
        al_ext.fused.dense_block_sgd_step_(x, t, params, params, 1e-3, 2e-3)
    overlapping = [params[0], params[0].view(-1)[: params[1].numel()], *params[2:]]  # c_f a view into W_f
    with pytest.raises(ValueError, match="W_f and c_f share memory"):
        al_ext.fused.dense_block_step(x, t, overlapping, "elu", "sigmoid", "A", "mse")
    with pytest.raises(ValueError, match="every width must be at least 1, got d_x = 0"):
        al_ext.fused.dense_block_step(x[:, :0], t, [params[0][:, :0], *params[1:]], "elu", "sigmoid", "A", "mse")
    with pytest.raises(RuntimeError, match="optimiser state must be on s_prev's device cpu, got meta"):
        al_ext.fused.dense_block_adam_step_(x, t, params, state, [torch.zeros_like(p) for p in params],
                                            torch.tensor(0.0, device="meta"), 1e-3, 2e-3)


def test_low_level_pieces_say_what_they_expected():
    with pytest.raises(ValueError, match=r"blocks\[0\]'s f and b have no parameters"):
        al_ext.AssociatedLearning([al_ext.ALBlock(nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity())], 3)
    bare = nn.Sequential()
    bare.num_classes = 3
    with pytest.raises(ValueError, match="the model has no parameters"):
        al_ext.make_engine(bare, "adam", 1e-3)
    with pytest.raises(TypeError, match="block must be an ALBlock"):
        al_ext.fused.FusedBlockAdam(nn.Linear(2, 2), 1e-3, 1e-3)
    block = small_mlp().blocks[0]
    for options, message in (({"lr": float("nan")}, "lr must be a finite number >= 0"),
                             ({"variant": "a"}, "variant must be one of"),
                             ({"compute_dtype": "bfloat16"}, "compute_dtype must be None")):
        with pytest.raises(ValueError, match=message):
            al_ext.fused.FusedBlockAdam(block, **{"lr": 1e-3, "ae_lr": 2e-3, **options})
    model = small_mlp(backend="reference")
    opts = al_ext.make_engine(model, "adam", 1e-3).optimizers
    with pytest.raises(ValueError, match=r"schedulers\[0\] is a ReduceLROnPlateau"):
        al_ext.Pipeline(model, opts, schedulers=[torch.optim.lr_scheduler.ReduceLROnPlateau(o) for o in opts])


def test_a_refused_run_leaves_the_run_in_progress_alone(monkeypatch):
    model = small_mlp()  # fused blocks: a run ends with scheduler_run_done on every optimiser
    engine = al_ext.make_engine(model, "adam", 1e-3)
    pipeline = al_ext.Pipeline(model, engine.optimizers)
    stream = pipeline.train(iter([batch(seed=i) for i in range(20)]))
    next(stream)
    calls = []
    for opt in engine.optimizers:
        monkeypatch.setattr(opt, "scheduler_run_done", lambda: calls.append(1))
    with pytest.raises(RuntimeError, match="still training this model"):
        al_ext.Pipeline(model, engine.optimizers).run([batch()])
    assert calls == []
    stream.close()


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")  # the tie's
def test_auto_takes_the_general_path_for_tied_weights():
    model = small_mlp(hidden=(16, 16), label_dim=16)
    model.blocks[1].h[0].weight = model.blocks[1].g[0].weight  # (16 x 16 both): a tie the fused step cannot update
    assert "ties some of its weights" in model.fused_block_problem() and not model.uses_fused_step()
    Trainer(model, progress=False, label_warmup=False).fit(batch(), epochs=1)


def test_texts_come_from_any_iterable_of_strings():
    import numpy as np
    vocabulary = text.Vocabulary(np.array(["the cat sat", "a dog"]))
    assert vocabulary.encode(np.array(["the dog"]), 3).tolist() == [[vocabulary.ids["the"], vocabulary.ids["dog"], 0]]
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string, got int"):
        text.Vocabulary(["a b", 3])


def test_a_fused_optimiser_refuses_groups_of_different_settings():
    block = small_mlp().blocks[0]
    fb = torch.optim.AdamW([{"params": list(block.f.parameters()), "weight_decay": 0.1},
                            {"params": list(block.b.parameters()), "weight_decay": 0.0}])
    gh = torch.optim.AdamW([*block.g.parameters(), *block.h.parameters()])
    with pytest.raises(ValueError, match="fb's parameter groups differ in their settings"):
        al_ext.fused.fused_block_optimizer(block, fb, gh, "A", "mse")
    one_group = torch.optim.Adam([{"params": [*block.f.parameters(), *block.b.parameters()], "weight_decay": 0.1}])
    fused = al_ext.fused.fused_block_optimizer(block, one_group, torch.optim.Adam(gh.param_groups[0]["params"]),
                                               "A", "mse")
    assert fused.defaults["weight_decay"] == 0.1  # the group's, not the constructor's default


def test_distributed_errors_name_the_launchers_rank(monkeypatch):
    from al_ext import cli
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli._rank_suffix() == " on rank 3"


@pytest.mark.parametrize("error", [KeyError, KeyboardInterrupt])
@pytest.mark.parametrize("pipeline", [False, True])
def test_a_hook_that_raises_leaves_one_consistent_run(pipeline, error):
    # pipelined, the batches already started finish and count before the error is raised: every block
    # has trained on the batches counted, so the run goes on (or saves) as if nothing had happened
    x, y = batch(n=96)

    class RaiseAtStep3:
        def on_step(self, trainer, record):
            if record["step"] == 3:
                raise error("a callback's bug")

    def run(callbacks):
        return Trainer(small_mlp(), batch_size=8, progress=False, label_warmup=False, pipeline=pipeline,
                       callbacks=callbacks)

    whole = run([])
    whole.fit((x, y), epochs=1)
    broken = run([RaiseAtStep3()])
    with pytest.raises(error, match="a callback's bug"):
        broken.fit((x, y), epochs=1)
    steps = {int(s["step"]) for opt in broken.optimizers for s in opt.state.values()}
    assert steps == {broken.global_step} and broken.position >= 3
    broken.callbacks = []
    broken.fit((x, y), epochs=1)
    for a, b in zip(whole.model.parameters(), broken.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_pipelined_run_stopped_at_once_cannot_be_saved_until_a_load(tmp_path):
    x, y = batch(n=96)
    trainer = Trainer(small_mlp(backend="reference"), batch_size=8, progress=False, label_warmup=False,
                      pipeline=True)
    trainer.save(tmp_path / "start.pt")
    calls = [0]

    def fail_on_the_fifth_batch(module, inputs):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("a block's bug")

    handle = trainer.model.blocks[1].f.register_forward_pre_hook(fail_on_the_fifth_batch)
    with pytest.raises(al_ext.PipelineError, match="a block's bug"):
        trainer.fit((x, y), epochs=1)
    handle.remove()
    with pytest.raises(RuntimeError, match="stopped at once .* with its blocks at different batches"):
        trainer.save(tmp_path / "broken.pt")
    trainer.load(tmp_path / "start.pt")
    trainer.save(tmp_path / "again.pt")


def test_a_pipelined_run_whose_batches_stop_coming_can_be_saved(tmp_path):
    # the batches already started finish on every block, so the run is one consistent state
    x, y = batch(n=96)

    class FailingAt(torch.utils.data.Dataset):
        def __len__(self):
            return 96

        def __getitem__(self, i):
            if i == 40:
                raise OSError("a corrupt sample")
            return x[i], y[i]

    trainer = Trainer(small_mlp(backend="reference"), batch_size=8, progress=False, label_warmup=False,
                      pipeline=True)
    with pytest.raises(OSError, match="a corrupt sample"):
        trainer.fit(torch.utils.data.DataLoader(FailingAt(), batch_size=8), epochs=1)
    trainer.save(tmp_path / "consistent.pt")
    steps = {int(s["step"]) for opt in trainer.optimizers for s in opt.state.values()}
    assert steps == {trainer.global_step}


def test_a_refused_load_changes_nothing(tmp_path):
    trainer = Trainer(small_mlp(), progress=False, label_warmup=False)
    trainer.fit(batch(), epochs=1)
    trainer.save(tmp_path / "fused.pt")
    other = Trainer(small_mlp(backend="reference"), progress=False)  # 4 optimisers where the checkpoint has 2
    before = [p.detach().clone() for p in other.model.parameters()]
    with pytest.raises(ValueError, match="the state holds 2 optimisers"):
        other.load(tmp_path / "fused.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, other.model.parameters()))


@pytest.mark.parametrize("scheduler,interval,error,message", [
    (lambda opt: None, "step", TypeError, "what scheduler.optimizer. returned must be a learning-rate scheduler"),
    (lambda opt: opt, "step", TypeError, "must be a learning-rate scheduler"),
    (lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), "step", ValueError, "scheduler_interval='epoch'"),
])
@pytest.mark.parametrize("pipeline", [False, True])
def test_what_a_scheduler_factory_returns_is_checked_before_training(scheduler, interval, error, message, pipeline):
    with pytest.raises(error, match=message):
        Trainer(small_mlp(), progress=False, pipeline=pipeline, scheduler=scheduler, scheduler_interval=interval)


# ---- hand-built models, and the engines' own API (a fourth review) ------------------------

def _lin(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, o), nn.Sigmoid())


def _dense_block(f: nn.Module, x_width: int, y_in: int = 3, label: int = 4) -> al_ext.ALBlock:
    bridge = nn.Sequential(nn.Linear(x_width, 8), nn.Sigmoid(), nn.Linear(8, label), nn.Sigmoid())
    return al_ext.ALBlock(f, _lin(y_in, label), bridge, _lin(label, y_in))


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda m, inputs, out: out * 2)
    return module


@pytest.mark.parametrize("f", [
    lambda: nn.Sequential(nn.Linear(8, 6), nn.ELU(alpha=0.2)),
    lambda: nn.Sequential(_ScaledLinear(8, 6), nn.ELU()),
    lambda: nn.Sequential(nn.Flatten(0), nn.Linear(8, 6), nn.ELU()),
    lambda: _hooked(nn.Sequential(nn.Linear(8, 6), nn.ReLU())),
    lambda: nn.Sequential(nn.Linear(8, 6), _hooked(nn.ReLU())),
], ids=["elu-alpha", "linear-subclass", "flatten-batch", "hooked-sequential", "hooked-activation"])
def test_a_block_the_fused_kernel_would_compute_differently_trains_through_autograd(f):
    model = al_ext.AssociatedLearning([_dense_block(f(), 6)], 3)
    assert model.fused_block_problem() is not None and not model.uses_fused_step()
    plain = al_ext.AssociatedLearning([_dense_block(nn.Sequential(nn.Linear(8, 6), nn.ELU()), 6)], 3)
    assert plain.fused_block_problem() is None


def test_a_hand_built_dense_model_that_flattens_its_input_trains_fused():
    model = al_ext.AssociatedLearning([_dense_block(nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ELU()), 6)], 3)
    x, y = torch.rand(16, 2, 4), torch.randint(0, 3, (16,))
    trainer = Trainer(model, batch_size=8, progress=False, label_warmup=False)
    assert type(trainer.engine).__name__ == "FusedALEngine"
    trainer.fit((x, y), epochs=1)


def test_a_module_shared_by_two_blocks_is_refused():
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    blocks = [_dense_block(nn.Sequential(nn.Linear(8, 6), nn.ReLU()), 6),
              _dense_block(shared, 6, 4), _dense_block(shared, 6, 4)]
    with pytest.raises(ValueError, match=r"blocks\[2\]'s f and b share a parameter .* with blocks\[1\]'s f and b"):
        al_ext.AssociatedLearning(blocks, 3)
    with pytest.raises(TypeError, match="blocks must be a list of ALBlocks, got ALBlock"):
        al_ext.AssociatedLearning(blocks[0], 3)


def test_a_block_part_that_returns_a_tuple_is_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _dense_block(nn.Sequential(nn.Linear(8, 6), nn.ReLU()), 6).b

        def forward(self, s):
            return self.inner(s), s

    block = _dense_block(nn.Sequential(nn.Linear(8, 6), nn.ReLU()), 6)
    block.b = Pair()
    model = al_ext.AssociatedLearning([block], 3, backend="reference")
    with pytest.raises(TypeError, match="block 1: the bridge b must return one tensor, got tuple"):
        model.local_losses(torch.rand(4, 8), torch.tensor([0, 1, 2, 0]))


def test_checkpoint_paths_that_are_folders_are_refused_before_training(tmp_path):
    trainer = Trainer(small_mlp(), progress=False)
    for name in ("checkpoint", "save_best"):
        with pytest.raises(ValueError, match=f"{name} must name a file, got the folder"):
            trainer.fit(batch(), val=batch(), epochs=1, **{name: tmp_path})
    assert trainer.history == []
    with pytest.raises(ValueError, match="path must name a file"):
        trainer.save(tmp_path)
    with pytest.raises(TypeError, match="path must be a path"):
        trainer.save(5)


def test_the_engines_check_what_a_loop_of_your_own_hands_them():
    x, y = batch()
    al_engine = al_ext.make_engine(small_mlp(backend="reference"), "adam", 1e-3)
    with pytest.raises(TypeError, match="each batch must be an .inputs, labels. pair, got tuple"):
        next(al_engine.train([(x, y, y)]))
    with pytest.raises(ValueError, match="labels must be 1-D"):
        al_engine.correct_counts([(x, y[:, None])])
    bp = al_ext.bp_baseline(small_mlp())
    bp_engine = al_ext.make_engine(bp, "adam", 1e-3)
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        bp_engine.step(x, y.float())
    with pytest.raises(ValueError, match=r"y must lie in \[0, 5\)"):
        bp_engine.step(x, y + 5)
    leaf = x.clone().requires_grad_()
    carrying_a_graph = leaf.exp()  # trains as data: a second batch used to backward through it again
    for _ in range(2):
        bp_engine.step(carrying_a_graph, y)
    assert leaf.grad is None
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        bp_engine.step(x, y.tolist())
    plain = nn.Sequential(nn.Linear(20, 5))  # a classifier that does not say its num_classes
    al_ext.make_engine(plain, "adam", 1e-3).step(x, y)


def test_a_list_of_batches_is_not_read_as_one_pair():
    x, y = batch()
    with pytest.raises(TypeError, match=r"train must be an \(inputs, labels\) pair .* got a list of 2 pairs"):
        Trainer(small_mlp(), progress=False).fit([(x, y), (x, y)], epochs=1)


def test_an_empty_validation_set_is_named():
    x, y = batch()
    with pytest.raises(ValueError, match="val holds no samples"):
        Trainer(small_mlp(), progress=False).fit((x, y), val=(x[:0], y[:0]), epochs=1)


def test_a_bp_classifier_with_the_wrong_number_of_scores_is_refused():
    narrow = nn.Sequential(nn.Linear(20, 3))
    narrow.num_classes = 5
    with pytest.raises(ValueError, match=r"class scores of shape \(samples, num_classes\) = \(12, 5\), got \(12, 3\)"):
        Trainer(narrow, progress=False).fit(batch(), epochs=1)


@pytest.mark.parametrize("leave", ["an open train() stream", "a run on a daemon thread", "a stream stuck in its data"])
def test_a_run_still_going_at_exit_lets_the_process_exit_cleanly(leave, tmp_path):
    script = tmp_path / "leave.py"
    script.write_text(f"""
import threading, time, torch, al_ext
torch.manual_seed(0)
model = al_ext.ALMLP(20, 3, hidden=(16, 16, 16), label_dim=8, backend="reference")
pipeline = al_ext.Pipeline(model, al_ext.make_engine(model, "adam", 1e-3).optimizers)
data = [(torch.rand(8, 20), torch.randint(0, 3, (8,))) for _ in range(5000)]
if {leave == "an open train() stream"}:
    stream = pipeline.train(data)
    next(stream)
elif {leave == "a stream stuck in its data"}:  # which nothing can interrupt: exit waits a bounded time
    import atexit
    from al_ext import pipeline as module
    atexit.unregister(module._stop_runs_at_exit)
    atexit.register(module._stop_runs_at_exit, timeout_s=1.0)

    def stuck():
        yield data[0]
        threading.Event().wait()

    stream = pipeline.train(stuck())
    next(stream)
else:
    threading.Thread(target=lambda: pipeline.run(data), daemon=True).start()
    time.sleep(0.3)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 or leave == "a stream stuck in its data", done.stderr[-2000:]


def test_the_pipelines_own_arguments_name_themselves():
    model = small_mlp(backend="reference")
    optimizers = al_ext.make_engine(model, "adam", 1e-3).optimizers
    for options, message in (({"max_in_flight": 2**31 + 5}, "max_in_flight must be below 2"),
                             ({"threads_per_stage": 2**31}, "threads_per_stage must be below 2"),
                             ({"schedulers": [1, 2, 3, 4]}, r"schedulers\[0\] must be a learning-rate scheduler")):
        with pytest.raises((TypeError, ValueError), match=message):
            al_ext.Pipeline(model, optimizers, **options)
    pipeline = al_ext.Pipeline(model, optimizers, precision="bf16")  # by name, as make_engine takes it
    assert pipeline.precision.name == "bf16"
    x, y = batch()
    for options, message in (({"on_batch": 5}, "on_batch must be a callable"),
                             ({"max_unreported": 1.5}, "max_unreported must be an integer from 0")):
        with pytest.raises((TypeError, ValueError), match=message):
            pipeline.run([(x, y)], **options)
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        pipeline.run([(x, y.tolist())])


def test_hooks_that_cannot_be_called_are_refused_before_training():
    trainer = Trainer(small_mlp(), progress=False)
    with pytest.raises(TypeError, match="on_epoch must be a callable"):
        trainer.fit(batch(), epochs=1, on_epoch=5)
    assert trainer.history == []

    class NotAHook:
        on_step = 5

    with pytest.raises(TypeError, match=r"callbacks\[0\].on_step must be callable"):
        Trainer(small_mlp(), progress=False, callbacks=[NotAHook()])


@pytest.mark.parametrize("pipelined", [False, True])
def test_ctrl_c_inside_a_block_step_stops_the_run_as_ctrl_c(pipelined):
    model = small_mlp(backend="reference")
    pipeline = al_ext.Pipeline(model, al_ext.make_engine(model, "adam", 1e-3).optimizers, pipelined=pipelined)
    calls = [0]

    def interrupt_on_the_fifth_batch(module, inputs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt

    model.blocks[1].f.register_forward_pre_hook(interrupt_on_the_fifth_batch)
    x, y = batch()
    with pytest.raises(KeyboardInterrupt):  # not a PipelineError naming a block that failed
        pipeline.run([(x, y)] * 12)


def _dense_step_args():
    block = small_mlp().blocks[0]
    params = [p.detach().clone() for p in al_ext.fused.dense_block_layout(block)[0]]
    x, y = batch()
    return block, params, x, torch.nn.functional.one_hot(y, 5).float()


def test_the_fused_update_refuses_state_that_is_another_tensors():
    """Only a tensor and its own state were compared: one exp_avg for two parameters of a
    shape, or a state that is another parameter, took two updates mid-step."""
    _, params, x, t = _dense_step_args()  # c_f and c_b1 are (24,), c_b2 and c_g (12,)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match=r"exp_avg\[1\] and exp_avg\[3\] share memory"):
        al_ext.fused.dense_block_adam_step_(x, t, params, [*m[:3], m[1], *m[4:]], v, 1, 1e-3, 2e-3)
    with pytest.raises(ValueError, match=r"c_f and exp_avg_sq\[3\] share memory"):
        al_ext.fused.dense_block_adam_step_(x, t, params, m, [*v[:3], params[1], *v[4:]], 1, 1e-3, 2e-3)
    with pytest.raises(ValueError, match=r"momentum_buffer\[5\] and momentum_buffer\[7\] share memory"):
        al_ext.fused.dense_block_sgd_step_(x, t, params, [*m[:7], m[5], *m[8:]], 1e-3, 2e-3)
    if al_ext.fused.bf16_compute_available():
        weights = [p.to(torch.bfloat16) for p in params]
        with pytest.raises(ValueError, match=r"compute_weights\[5\] and compute_weights\[7\] share memory"):
            al_ext.fused.dense_block_sgd_step_(x, t, params, m, 1e-3, 2e-3, compute_dtype=torch.bfloat16,
                                               compute_weights=[*weights[:7], weights[5], *weights[8:]])


def test_the_fused_wrappers_name_bad_settings():
    _, params, x, t = _dense_step_args()
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    adam = al_ext.fused.dense_block_adam_step_
    for kwargs, error, message in (
            ({"decoupled_weight_decay": "False"}, TypeError, "decoupled_weight_decay must be True or False"),
            ({"lr_fb": True}, ValueError, "lr_fb must be a finite number >= 0"),
            ({"lr_gh": "0.1"}, ValueError, "lr_gh must be a finite number >= 0"),
            ({"step": "2"}, ValueError, "step must be the step number after this update"),
            ({"step": 1.5}, ValueError, "step must be the step number after this update"),
            ({"betas": (0.9,)}, ValueError, r"betas must be a pair \(beta1, beta2\)"),
            ({"betas": 0.9}, ValueError, r"betas must be a pair \(beta1, beta2\)"),
            ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be a number in \[0, 1\)"),
            ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
            ({"weight_decay": True}, ValueError, "weight_decay must be a finite number >= 0"),
            ({"s_prev": [[1.0]]}, TypeError, "s_prev must be a torch.Tensor")):
        args = {"s_prev": x, "t_prev": t, "params": params, "exp_avg": state[0], "exp_avg_sq": state[1], "step": 1,
                "lr_fb": 1e-3, "lr_gh": 2e-3, **kwargs}
        with pytest.raises(error, match=message):
            adam(**args)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        al_ext.fused.dense_block_sgd_step_(x, t, params, state[0], 1e-3, 2e-3, momentum=1.0)


def test_the_fused_ops_count_their_writes_for_autograd():
    """torch refuses a backward through a value an in-place op overwrote; the fused update
    writes in place too, and the version counts it."""
    _, params, x, t = _dense_step_args()
    weights = [nn.Parameter(p) for p in params]
    y = (weights[0] * weights[0]).sum()
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    al_ext.fused.dense_block_adam_step_(x, t, weights, *state, 1, 1e-1, 1e-1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_the_fused_optimisers_check_their_settings_so_auto_falls_back():
    block = small_mlp().blocks[0]
    for options, message in (({"eps": 0.0}, "eps must be a finite number > 0"),
                             ({"betas": (0.9, 1.0)}, r"betas\[1\] must be a number in \[0, 1\)"),
                             ({"decoupled_weight_decay": "no"}, "decoupled_weight_decay must be True or False")):
        with pytest.raises((ValueError, TypeError), match=message):
            al_ext.fused.FusedBlockAdam(block, 1e-3, 2e-3, **options)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        al_ext.fused.FusedBlockSGD(block, 1e-3, 2e-3, momentum=1.0)
    model = small_mlp()
    engine = al_ext.make_engine(model, lambda params, lr: torch.optim.Adam(params, lr, eps=0.0), 1e-3)
    assert type(engine).__name__ == "ALEngine"
    x, y = batch()
    engine.step(x, y)


def test_apply_gradients_takes_one_gradient_of_each_parameters_shape():
    """torch's fused CPU kernel, which apply_gradients calls, reads past a gradient too small."""
    block = small_mlp().blocks[0]
    params = al_ext.fused.dense_block_layout(block)[0]
    for optimiser in (al_ext.fused.FusedBlockAdam(block, 1e-3, 2e-3), al_ext.fused.FusedBlockSGD(block, 1e-3, 2e-3)):
        with pytest.raises(ValueError, match=r"the gradient of W_f must be shaped like it"):
            optimiser.apply_gradients([torch.zeros(1)] * 10)
        with pytest.raises(ValueError, match="grads must hold one gradient per parameter"):
            optimiser.apply_gradients([torch.zeros_like(p) for p in params[:9]])
        for scale in (0.0, float("nan"), -2.0):
            with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
                optimiser.apply_gradients([torch.zeros_like(p) for p in params], grad_scale=scale)
        before = [p.detach().clone() for p in params]
        optimiser.apply_gradients([torch.zeros_like(p) for p in params], grad_scale=2.0)
        assert all(torch.isfinite(p).all() for p in params) and len(before) == 10


def test_frozen_parameters_keep_the_fused_step_off_their_block():
    model = small_mlp()
    frozen = model.blocks[0].f[1].weight
    frozen.requires_grad_(False)
    assert "W_f is frozen" in model.fused_block_problem() and not model.uses_fused_step()
    before = frozen.detach().clone()
    x, y = batch()
    engine = al_ext.make_engine(model, "adam", 1e-2)
    engine.step(x, y)
    assert torch.equal(frozen, before)
    with pytest.raises(ValueError, match=r"W_f is frozen \(requires_grad=False\)"):
        al_ext.fused.FusedBlockAdam(model.blocks[0], 1e-3, 2e-3)


def test_a_fused_block_step_needs_its_step_counts():
    block = small_mlp().blocks[0]
    params = [p.detach() for p in al_ext.fused.dense_block_layout(block)[0]]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    with pytest.raises(ValueError, match="steps must hold the parameters' step counts"):
        al_ext._extension._C.fused_adam_block_step(params, *state, [], 1e-3, 1e-3, 0.9, 0.999, 1e-8, "elu",
                                                    "sigmoid", "A", "mse")


def test_text_of_any_script_tokenizes_and_text_of_no_words_is_refused():
    assert text.tokenize("Café naïve Straße, l'été") == ["café", "naïve", "straße", "l'été"]
    assert text.tokenize("w1 t0_3 <br />x") == ["w1", "t0", "3", "x"]  # ASCII as before: _ splits
    with pytest.raises(ValueError, match="texts hold no word seen at least min_count=1 times"):
        text.Vocabulary(["...", "!!"])
    with pytest.raises(ValueError, match=r"length must be \(shortest, longest\) words"):
        text.generated_topics(10, length=(3, 24))
    with pytest.raises(ValueError, match=r"length must be \(shortest, longest\) words"):
        text.generated_topics(10, length=(9, 8))


def test_token_ids_of_any_integer_dtype_reach_the_embedding_as_indices():
    model = al_ext.models.LSTM_AL(10, 2, hidden=(4,), embed_dim=4, label_dim=4)
    x = torch.randint(1, 10, (3, 5))
    expected = model.predict(x)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(model.predict(x.to(dtype)), expected)


def test_only_convolution_weights_take_channels_last():
    """Another module's 4-D parameter may be read as flat memory (view(-1))."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3, 4, 4))

        def forward(self, x):
            return x @ self.w.view(-1)[: x.shape[1]].unsqueeze(1)

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Flat())
    memory_format.use_fastest_memory_format(model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and model[1].w.is_contiguous()


def test_preset_switches_and_training_settings_are_checked():
    with pytest.raises(TypeError, match="bidirectional must be True or False, got 'no'"):
        al_ext.models.LSTM_AL(10, 2, bidirectional="no")
    assert al_ext.models.LSTM_AL(10, 2, bidirectional=np.True_).blocks[0].f is not None  # numpy's bool is a bool
    settings = presets.training_settings
    assert settings("neco", family="ResNet_AL") == settings("neco", family=al_ext.models.ResNet_AL)
    assert settings("neco", np.int64(64), np.float32(0.5)) == settings("neco", 64, 0.5)
    for kwargs, message in (({"batch_size": 0}, "batch_size must be"), ({"batch_size": 1.5}, "batch_size must be"),
                            ({"width_ratio": -1.0}, "width_ratio must be a positive finite number"),
                            ({"width_ratio": float("nan")}, "width_ratio must be a positive finite number"),
                            ({"width_ratio": "half"}, "width_ratio must be a positive finite number"),
                            ({"family": "resnet_al"}, "family must be one of 'ALMLP', .* got 'resnet_al'")):
        with pytest.raises((TypeError, ValueError), match=message):
            settings("neco", **kwargs)


def test_file_loggers_write_on_the_process_that_writes_checkpoints_only(tmp_path):
    model = small_mlp(backend="reference")
    logger = al_ext.callbacks.CSVLogger(tmp_path)
    trainer = Trainer(model, batch_size=8, progress=False, label_warmup=False, callbacks=[logger])
    trainer.engine.is_writer = False  # as on a distributed run's other ranks
    trainer.fit(batch(24), epochs=1)
    assert not any(path.stat().st_size for path in tmp_path.iterdir())


@pytest.mark.parametrize("writer", [True, False])
def test_the_tensorboard_logger_makes_its_writer_on_the_writing_rank_only(monkeypatch, tmp_path, writer):
    """A SummaryWriter made on every rank left an empty event file per rank in the shared
    folder. torch.utils.tensorboard is stood in for, so that this runs without tensorboard."""
    import types
    made: list[list[tuple[str, float, int]]] = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            made.append([])

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            made[-1].append((tag, value, step))

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger = al_ext.callbacks.TensorBoardLogger(tmp_path, every=1)
    trainer = Trainer(small_mlp(backend="reference"), batch_size=8, progress=False, label_warmup=False,
                      callbacks=[logger])
    trainer.engine.is_writer = writer
    trainer.fit(batch(24), epochs=1)
    logger.close()
    assert len(made) == int(writer)
    if writer:
        steps = {step for tag, _, step in made[0] if tag.startswith("train/")}
        epochs = {step for tag, _, step in made[0] if tag.startswith("epoch/")}
        assert steps == {1, 2, 3} and epochs == {1}, made[0]
