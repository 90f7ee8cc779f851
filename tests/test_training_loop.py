"""The Trainer's one loop over pluggable engines: streaming into the pipeline, any optimiser and
per-step schedule (pipelined equal to sequential), your own loop, hooks and loggers, step-exact
resume, and the errors every engine raises."""
import csv
import math
import json

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import al_ext
from al_ext import NonFiniteLossError, Pipeline, Trainer
from al_ext.callbacks import CSVLogger, JSONLinesLogger, TensorBoardLogger, tensorboard_available
from al_ext.engines import ALEngine, BPEngine, FusedALEngine, PipelinedALEngine, make_engine
from al_ext.fused import bf16_compute_available
from al_ext.optim import optimizer_factory

from conftest import small_mlp


def data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 5, (n,), generator=gen)


# The engine a dense AL model trains with in bf16 on this CPU (tests/test_dense_block_bf16.py).
BF16_AL_ENGINE = FusedALEngine if bf16_compute_available() else ALEngine


def one_thread(fn):
    """Runs fn with one intra-op thread: the pipeline's stages here have one each, and equal
    thread counts give the same GEMM rounding, hence bit-for-bit equal parameters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def one_cycle(opt, cycle_momentum=False):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3 * g["lr"] for g in opt.param_groups], total_steps=40,
                                               cycle_momentum=cycle_momentum)


# ---- engines and optimisers ----------------------------------------------------------------

def test_the_engine_follows_the_model_and_the_optimizer():
    assert isinstance(Trainer(small_mlp(), progress=False).engine, FusedALEngine)
    assert isinstance(Trainer(small_mlp(backend="reference"), progress=False).engine, ALEngine)
    assert isinstance(Trainer(al_ext.bp_baseline(small_mlp()), progress=False).engine, BPEngine)
    assert isinstance(Trainer(small_mlp(), pipeline=True, progress=False).engine, PipelinedALEngine)
    rmsprop = lambda params, lr: torch.optim.RMSprop(params, lr=lr)  # noqa: E731 - no fused form
    auto = Trainer(small_mlp(), optimizer=rmsprop, progress=False)
    assert isinstance(auto.engine, ALEngine) and isinstance(auto.optimizers[0], torch.optim.RMSprop)
    with pytest.raises(ValueError, match="backend='fused' cannot train this way: RMSprop has no fused "
                                         "form.*general path takes any torch optimiser.*backend='reference'"):
        Trainer(small_mlp(backend="fused"), optimizer=rmsprop, progress=False)
    with pytest.raises(ValueError, match="amsgrad=True has no fused form"):
        Trainer(small_mlp(backend="fused"), optimizer=lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True))


@pytest.mark.parametrize("optimizer", [
    "adamw",
    lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.8, 0.99), weight_decay=0.1),
    lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.5, weight_decay=0.05),
], ids=["adamw", "adam-l2", "sgd-l2"])
def test_fused_optimizers_match_torch_optimizers_in_float64(optimizer):
    x, y = (t[:48] for t in data())
    models = [small_mlp(backend=b).double() for b in ("fused", "reference")]
    trainers = [Trainer(m, lr=0.02, batch_size=16, optimizer=optimizer, progress=False) for m in models]
    assert isinstance(trainers[0].engine, FusedALEngine) and isinstance(trainers[1].engine, ALEngine)
    for trainer in trainers:
        trainer.fit((x.double(), y), epochs=2)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_weight_decay_reaches_the_fused_op():
    opt = Trainer(small_mlp(), optimizer="adamw", weight_decay=0.3, progress=False).optimizers[0]
    assert opt.defaults["weight_decay"] == 0.3 and opt.defaults["decoupled_weight_decay"]
    params = [p.detach() for p in al_ext.fused.dense_block_layout(small_mlp().blocks[0])[0]]
    s, t = torch.randn(4, 20), small_mlp().label_targets(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -1"):
        al_ext.fused.dense_block_sgd_step_(s, t, params, [torch.zeros_like(p) for p in params], 0.1, 0.1, 0.9,
                                           weight_decay=-1.0)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_pipelined_equals_sequential_with_a_schedule(backend, interval):
    def train(pipeline):
        model = small_mlp(hidden=(24, 16, 12), backend=backend)
        trainer = Trainer(model, batch_size=8, progress=False, scheduler=one_cycle, scheduler_interval=interval,
                          pipeline=pipeline, threads_per_stage=1 if pipeline else None,
                          pipeline_stages=3 if pipeline else None)
        history = trainer.fit(data(), epochs=3)
        return params_of(model), [r["lr"] for r in history], trainer

    (seq, seq_lrs, _), (pipe, pipe_lrs, trainer) = one_thread(lambda: train(False)), one_thread(lambda: train(True))
    assert all(torch.equal(a, b) for a, b in zip(seq, pipe))
    assert seq_lrs == pipe_lrs and len(set(seq_lrs)) == 3, "the rate changed along the run"
    expected = 36 if interval == "step" else 3  # 12 batches an epoch
    assert all(s.last_epoch == expected for s in trainer.engine.schedulers)


def test_a_schedule_that_cycles_momentum_takes_the_general_path():
    cycling = lambda opt: one_cycle(opt, cycle_momentum=True)  # noqa: E731 - changes Adam's beta1 every step
    assert isinstance(Trainer(small_mlp(), scheduler=cycling, progress=False).engine, ALEngine)
    with pytest.raises(ValueError, match="a schedule that cycles momentum .* changes the betas or momentum"):
        Trainer(small_mlp(backend="fused"), scheduler=cycling, progress=False)
    x, y = (t[:48] for t in data())
    models = [small_mlp(backend=b).double() for b in ("auto", "reference")]
    for model in models:
        Trainer(model, lr=0.02, batch_size=16, scheduler=cycling, progress=False).fit((x.double(), y), epochs=2)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cuda_graphs_refuse_a_per_step_schedule():
    model = small_mlp()
    opts = Trainer(model, progress=False).optimizers
    with pytest.raises(ValueError, match="a per-step schedule needs cuda_graphs=False"):
        Pipeline(model, opts, cuda_graphs=True, schedulers=[one_cycle(o) for o in opts])


# ---- streaming, and your own loop ----------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True], ids=["stages", "shared"])
def test_the_pipeline_pulls_batches_only_as_it_trains_them(shared):
    x, y = data(8 * 40)
    pulled = []

    def stream():
        for j in range(40):
            pulled.append(j)
            yield x[8 * j : 8 * j + 8], y[8 * j : 8 * j + 8]

    model = small_mlp(hidden=(24, 16, 12))
    pipeline = Pipeline(model, Trainer(model, progress=False).optimizers, stages=3, max_in_flight=2, shared=shared)
    ahead = []
    run = pipeline.run(stream(), on_batch=lambda j, losses: ahead.append(len(pulled) - j),
                       max_unreported=pipeline.lookahead)
    assert run.losses.shape == (40, 3, 2)
    # When batch j is reported, batches 0..j-1 are: at most lookahead more were pulled, which is
    # one batch in each of 3 stages (blocks) and 2 in each of the 2 queues (waiting for blocks 2, 3).
    assert pipeline.lookahead == 7 and max(ahead) <= pipeline.lookahead, ahead


@pytest.mark.parametrize("shared", [False, True], ids=["stages", "shared"])
def test_your_own_loop_stops_early_with_every_block_on_the_same_batches(shared):
    x, y = data(8 * 30)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]

    def pipelined():
        model = small_mlp(hidden=(24, 16, 12))
        pipeline = Pipeline(model, Trainer(model, progress=False).optimizers, stages=3, threads_per_stage=1,
                            shared=shared)
        seen = []
        for step, losses in enumerate(pipeline.train(iter(batches))):
            assert losses.shape == (3, 2) and bool(torch.isfinite(losses).all())
            seen.append(losses)
            if step == 4:
                break
        return model, len(pipeline.last_run.losses), seen, pipeline

    model, trained, seen, pipeline = one_thread(pipelined)
    assert pipeline.lookahead == 3 + 2 * 2  # a batch in each stage, max_in_flight in each queue
    assert 5 <= trained <= 5 + pipeline.lookahead + pipeline.max_in_flight + 1
    twin = small_mlp(hidden=(24, 16, 12))
    engine = make_engine(twin, optimizer_factory("adam"), 1e-3, 2e-3)
    own = one_thread(lambda: [engine.step(*twin_batch) for twin_batch in batches[:trained]])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a.double(), b.double()) for a, b in zip(seen, own))


def test_the_trainer_streams_a_dataloader_with_workers():
    x, y = data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, num_workers=1, pin_memory=False)
    history = Trainer(small_mlp(), pipeline=True, progress=False).fit(loader, epochs=1)
    assert history[0]["samples_per_s"] > 0 and len(history[0]["loss_as"]) == 2


def test_an_error_in_the_stream_ends_the_run_and_is_raised():
    x, y = data(64)

    def stream():
        yield x[:16], y[:16]
        raise KeyError("the data is gone")

    model = small_mlp()
    pipeline = Pipeline(model, Trainer(model, progress=False).optimizers)
    with pytest.raises(KeyError, match="the data is gone"):
        pipeline.run(stream())
    assert pipeline.run([(x[:16], y[:16])]).losses.shape == (1, 2, 2), "a later run works"
    with pytest.raises(TypeError, match="each batch must be an \\(inputs, labels\\) pair"):
        pipeline.run([x[:16]])


# ---- hooks, loggers, the progress line -----------------------------------------------------

class Recorder(al_ext.callbacks.Callback):
    def __init__(self, stop_at=None):
        self.steps, self.epochs, self.validations, self.stop_at = [], [], [], stop_at

    def on_step(self, trainer, record):
        self.steps.append(record)
        if record["step"] == self.stop_at:
            trainer.should_stop = True

    def on_validation(self, trainer, metrics):
        self.validations.append(metrics)

    def on_epoch(self, trainer, record):
        self.epochs.append(record)


@pytest.mark.parametrize("pipeline", [False, True])
def test_callbacks_see_every_step_epoch_and_validation(pipeline):
    recorder = Recorder()
    trainer = Trainer(small_mlp(), batch_size=16, callbacks=[recorder], pipeline=pipeline, progress=False)
    trainer.fit(data(), data(32, seed=1), epochs=2)
    assert [r["step"] for r in recorder.steps] == list(range(1, 13))
    assert [r["batch"] for r in recorder.steps] == list(range(6)) * 2
    assert {"loss_as", "loss_ae", "lr", "samples", "samples_per_s", "epoch"} <= set(recorder.steps[0])
    assert [r["epoch"] for r in recorder.epochs] == [1, 2] and len(recorder.validations) == 2
    assert "shortcut_accuracy" in recorder.validations[0]


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_callback_stops_the_run(pipeline):
    trainer = Trainer(small_mlp(), batch_size=8, callbacks=[Recorder(stop_at=3)], pipeline=pipeline, progress=False)
    history = trainer.fit(data(256), epochs=5)  # 32 batches an epoch
    assert history == [] and trainer.epoch == 0 and 3 <= trainer.position < 32


def test_loggers_write_json_lines_and_csv(tmp_path):
    loggers = [JSONLinesLogger(tmp_path), CSVLogger(tmp_path)]
    trainer = Trainer(small_mlp(), batch_size=32, callbacks=loggers, progress=False)
    trainer.fit(data(), epochs=2)
    trainer.close_callbacks()
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 7)) and len(steps[0]["loss_as"]) == 2
    epochs = list(csv.DictReader((tmp_path / "epochs.csv").open()))
    assert [e["epoch"] for e in epochs] == ["1", "2"] and {"loss_as_1", "loss_as_2", "loss_ae_2"} <= set(epochs[0])
    assert epochs[0]["label_warmup_steps"] != "" and epochs[1]["label_warmup_steps"] == ""


def test_a_resumed_run_appends_its_csv_rows_under_the_files_header(tmp_path):
    first = CSVLogger(tmp_path)
    first.on_epoch(None, {"epoch": 1, "loss": 0.5, "label_warmup_steps": 30, "val_accuracy": 0.4})
    first.close()
    resumed = CSVLogger(tmp_path)  # a later record has fewer keys, and one the file has no column for
    resumed.on_epoch(None, {"epoch": 2, "loss": 0.25, "val_accuracy": 0.6, "new": 1})
    resumed.close()
    rows = list(csv.DictReader((tmp_path / "epochs.csv").open()))
    assert rows == [{"epoch": "1", "loss": "0.5", "label_warmup_steps": "30", "val_accuracy": "0.4"},
                    {"epoch": "2", "loss": "0.25", "label_warmup_steps": "", "val_accuracy": "0.6"}]


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed (pip install al-ext[tensorboard])")
def test_tensorboard_logger_writes_events(tmp_path):
    logger = TensorBoardLogger(tmp_path, every=1)
    Trainer(small_mlp(), batch_size=32, callbacks=[logger], progress=False).fit(data(), epochs=1)
    logger.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))


# ---- checkpoints -------------------------------------------------------------------------

def same_run(a, b):
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert [r["loss_as"] for r in a.history] == [r["loss_as"] for r in b.history]
    assert a.global_step == b.global_step


@pytest.mark.parametrize("pipeline,source", [(False, "tensors"), (True, "tensors"), (False, "dataloader")])
def test_resume_from_any_step_mid_epoch_is_bit_exact(tmp_path, pipeline, source):
    x, y = data()
    train = (x, y) if source == "tensors" else DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    def trainer(**kwargs):
        return Trainer(small_mlp(hidden=(24, 16, 12)), batch_size=16, progress=False, scheduler=one_cycle,
                       pipeline=pipeline, threads_per_stage=1 if pipeline else None, **kwargs)

    def whole():
        t = trainer()
        t.fit(train, epochs=2)
        return t

    def interrupted():
        t = trainer(callbacks=[Recorder(stop_at=4)])  # stops the run in its first epoch
        t.fit(train, epochs=2, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=1)
        assert t.epoch == 0 and t.position >= 4
        resumed = trainer()
        resumed.load(tmp_path / "ckpt.pt")
        assert resumed.position == t.position
        resumed.fit(train, epochs=2, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=1)
        return resumed

    same_run(one_thread(whole), one_thread(interrupted))


def test_best_weights_go_to_their_own_file_and_save_is_refused_mid_pipeline(tmp_path):
    trainer = Trainer(small_mlp(), batch_size=16, progress=False)
    trainer.fit(data(), data(32, seed=1), epochs=2, checkpoint=tmp_path / "ckpt.pt", save_best=tmp_path / "best.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "best_state" not in ckpt and set(torch.load(tmp_path / "best.pt", weights_only=True)) == set(ckpt["model"])
    resumed = Trainer(small_mlp(seed=3), batch_size=16, progress=False)
    resumed.load(tmp_path / "ckpt.pt")
    resumed.restore_best()  # from best.pt
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in best.items())

    class SaveNow(al_ext.callbacks.Callback):
        def on_step(self, trainer, record):
            trainer.save(tmp_path / "mid.pt")

    with pytest.raises(RuntimeError, match="save\\(\\) was called while the pipeline is running"):
        Trainer(small_mlp(), batch_size=16, pipeline=True, callbacks=[SaveNow()], progress=False).fit(data(), epochs=1)


# ---- errors and small defects --------------------------------------------------------------

def test_every_engine_raises_non_finite_loss_error_with_where():
    x, y = data(32)
    x_bad = x.clone()
    for model, pipeline, loss, block in [(al_ext.bp_baseline(small_mlp()), False, "loss", None),
                                          (small_mlp(backend="reference"), False, "L_as", 2),
                                          (small_mlp(), False, "L_as", 2), (small_mlp(), True, "L_as", 2)]:
        with torch.no_grad():
            target = model.encoders[1] if block is None else model.blocks[1].f
            next(target.parameters())[0, 0] = float("nan")
        trainer = Trainer(model, batch_size=8, pipeline=pipeline, progress=False)
        with pytest.raises(NonFiniteLossError) as err:
            trainer.fit((x_bad, y), epochs=1)
        assert (err.value.loss, err.value.block, err.value.batch, err.value.epoch) == (loss, block, 0, 1), err.value
        assert isinstance(err.value, FloatingPointError)


def test_adaptive_threshold_must_be_a_confidence():
    model = small_mlp()
    for bad in (0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="threshold must be a confidence in \\(0, 1\\]"):
            model.predict_adaptive(torch.randn(2, 20), bad)
    assert model.predict_adaptive(torch.randn(2, 20), 1)[0].shape == (2,)


def test_the_package_exposes_its_modules():
    assert al_ext.models.ALCNN and al_ext.text.Vocabulary and al_ext.callbacks.CSVLogger and al_ext.engines.Engine


@pytest.mark.parametrize("kwargs,message", [
    ({"optimizer": "adagrad"}, "optimizer must be one of 'adam', 'adamw', 'sgd', got 'adagrad'"),
    ({"optimizer": 3}, "optimizer must be a name or a callable"),
    ({"scheduler": "cosine"}, "scheduler must be a callable"),
    ({"scheduler_interval": "batch"}, "scheduler_interval must be one of 'step', 'epoch', got 'batch'"),
    ({"schedule": "neco", "scheduler": one_cycle}, "give schedule .* or scheduler .*, not both"),
    ({"weight_decay": -1}, "weight_decay must be a number >= 0"),
    ({"callbacks": [lambda trainer, record: None]}, "callbacks\\[0\\] must have at least one of on_step"),
    ({"callbacks": [al_ext.callbacks.Callback]}, r"callbacks\[0\] must be a callback object, got the class Callback"),
    ({"optimizer": lambda p, lr: torch.optim.Adam(p, lr=lr), "weight_decay": 0.1}, "weight_decay goes with an optimizer name"),
])
def test_bad_optimizer_and_schedule_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Trainer(small_mlp(), progress=False, **kwargs)


def test_checkpoint_every_needs_a_checkpoint():
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint="):
        Trainer(small_mlp(), progress=False).fit(data(), epochs=1, checkpoint_every=2)


# ---- precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("model_kind", ["al", "bp"])
def test_bf16_keeps_float32_master_weights_state_and_losses(model_kind):
    model = small_mlp() if model_kind == "al" else al_ext.bp_baseline(small_mlp())
    trainer = Trainer(model, batch_size=16, precision="bf16", progress=False)
    # A dense AL model takes the fused bf16 step where the CPU has bf16 hardware.
    assert isinstance(trainer.engine, BF16_AL_ENGINE if model_kind == "al" else BPEngine)
    x, y = data(32)
    losses = trainer.engine.step(x, y)
    assert losses.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for opt in trainer.optimizers:
        assert all(v.dtype == torch.float32 for state in opt.state.values() for v in state.values() if v.dim())


def test_bf16_runs_the_math_in_bfloat16():
    seen = []
    model = small_mlp(backend="reference")
    model.blocks[0].f.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    Trainer(model, precision="bf16", progress=False).step(*data(8))
    assert seen == [torch.bfloat16]


def test_bf16_learns_and_pipelines_bit_for_bit():
    x, y = al_ext.data.load_digits()
    parts = al_ext.data.split_dataset(x, y, val=0.15, test=0.15, seed=0)

    def train(pipeline):
        torch.manual_seed(0)
        model = al_ext.ALMLP(64, 10, hidden=(64, 64), label_dim=64, bridge_factor=2, first_ae_loss="cross_entropy")
        trainer = Trainer(model, lr=2e-3, batch_size=32, precision="bf16", pipeline=pipeline,
                          threads_per_stage=1 if pipeline else None, progress=False)
        trainer.fit(parts.train, epochs=6)
        return params_of(model), trainer.evaluate(parts.test)["accuracy"]

    (seq, accuracy), (pipe, _) = one_thread(lambda: train(False)), one_thread(lambda: train(True))
    assert all(torch.equal(a, b) for a, b in zip(seq, pipe))
    assert accuracy > 0.85  # fp32 reaches 0.90 here


def test_bf16_resumes_bit_for_bit(tmp_path):
    def trainer(**kwargs):
        return Trainer(small_mlp(), batch_size=16, precision="bf16", progress=False, **kwargs)

    whole = trainer()
    whole.fit(data(), epochs=2)
    part = trainer(callbacks=[Recorder(stop_at=8)])
    part.fit(data(), epochs=2, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=100)
    resumed = trainer()
    resumed.load(tmp_path / "ckpt.pt")
    resumed.fit(data(), epochs=2)
    same_run(whole, resumed)


def test_named_optimizers_use_torchs_fused_kernels():
    for name in ("adam", "adamw", "sgd"):
        trainer = Trainer(small_mlp(backend="reference"), optimizer=name, progress=False)
        assert all(opt.defaults["fused"] for opt in trainer.optimizers)
        assert Trainer(al_ext.bp_baseline(small_mlp()), optimizer=name, progress=False).optimizers[0].defaults["fused"]


@pytest.mark.parametrize("kwargs,message", [
    ({"precision": "fp8"}, "precision must be one of 'fp32', 'bf16', 'fp16'"),
    ({"precision": "fp16"}, "precision='fp16' runs on CUDA only"),
])
def test_bad_precision(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(small_mlp(), progress=False, **kwargs)
    with pytest.raises(ValueError, match="keeps float32 master weights: the model's parameters must be float32"):
        Trainer(small_mlp().double(), precision="bf16", progress=False)


@pytest.mark.parametrize("has_hardware", [True, False])
def test_bf16_warns_where_the_cpu_would_emulate_it(monkeypatch, has_hardware):
    """Emulated bf16 GEMMs ran ALCNN 10x slower than float32 on an AVX2 CPU: said at once."""
    info = al_ext._C.build_info()
    monkeypatch.setattr(al_ext.precision._C, "build_info", lambda: {**info, "cpu_bf16_gemm": has_hardware})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(small_mlp(), precision="bf16", progress=False)
    said = [str(w.message) for w in caught if "emulated" in str(w.message)]
    assert said == ([] if has_hardware else [
        "precision='bf16': this CPU has no bfloat16 matrix hardware (AVX512_BF16 or AMX), so its bf16 matrix products "
        "are emulated and run slower than float32's; precision='fp32' is faster here"])


def test_compile_runs_the_block_steps_through_torch_compile():
    x, y = data(32)
    models = [small_mlp(backend="reference") for _ in range(2)]
    engines = [Trainer(m, batch_size=16, compile=c, progress=False).engine for m, c in zip(models, (False, True))]
    assert engines[1]._compiled is not None and isinstance(engines[1], ALEngine)
    for _ in range(2):
        losses = [e.step(x, y) for e in engines]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="compile=True compiles the sequential engine"):
        Trainer(small_mlp(), compile=True, pipeline=True, progress=False)
    with pytest.raises(ValueError, match="compile=True compiles the general path"):
        Trainer(small_mlp(backend="fused"), compile=True, progress=False)



def test_compile_traces_every_block_as_one_graph(monkeypatch):
    """As a user compiling their own step would: one graph for every block, whatever their
    inputs' ranks (per-block graphs shared one function and hit dynamo's recompile limit)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend, **kw))
    torch.manual_seed(0)
    model = al_ext.models.ALCNN((1, 8, 8), 3, channels=[(2, 2)] * 9, strides=[1] * 9, label_dim=8, bridge_factor=1)
    eager = al_ext.models.ALCNN((1, 8, 8), 3, channels=[(2, 2)] * 9, strides=[1] * 9, label_dim=8, bridge_factor=1)
    eager.load_state_dict(model.state_dict())
    x, y = torch.rand(4, 64), torch.tensor([0, 1, 2, 0])
    engines = [make_engine(m, optimizer_factory("adam"), 1e-3, compile=c) for m, c in ((eager, False), (model, True))]
    for _ in range(2):
        losses = [e.step(x, y) for e in engines]
        torch.testing.assert_close(losses[1], losses[0])
    assert len(graphs) == 1

# ---- a collapsed label side ----------------------------------------------------------------

def test_a_label_side_stuck_at_its_trivial_solution_is_reported():
    x, y = al_ext.data.load_digits()
    parts = al_ext.data.split_dataset(x, y, val=0.2, test=0, seed=0)
    torch.manual_seed(0)
    model = al_ext.ALMLP(64, 10, hidden=(32, 32), label_dim=32, bridge_factor=2)
    with torch.no_grad():  # h_1 predicts 0.1 for every class, and too small a rate keeps it there
        model.blocks[0].h[0].weight.zero_()
        model.blocks[0].h[0].bias.fill_(-math.log(9.0))
    trainer = Trainer(model, lr=1e-9, batch_size=64, progress=False, label_warmup=False)
    with pytest.warns(RuntimeWarning, match="label side looks stuck at its trivial solution.*label_warmup=True.*"
                                            "first_ae_loss="):
        history = trainer.fit(parts.train, parts.val, epochs=1)
    assert "block 1's L_ae is 0.0900" in history[0]["collapse_warning"]
    healthy = Trainer(al_ext.ALMLP(64, 10, hidden=(32, 32), label_dim=32, bridge_factor=2,
                                   first_ae_loss="cross_entropy"), lr=3e-3, batch_size=32, progress=False,
                      label_warmup=False)
    with pytest.warns(RuntimeWarning, match="the deeper blocks' label side has not yet"):  # epoch 2: block 2 lags
        history = healthy.fit(parts.train, parts.val, epochs=3)
    assert all("trivial solution" not in r.get("collapse_warning", "") for r in history)
    assert "collapse_warning" not in history[-1] and history[-1]["val_accuracy"] > 0.3, "block 2 has caught up"


@pytest.mark.parametrize(
    "accuracy,expected",
    [
        ([0.92, 0.10], "the full path answers at chance while the shortcut of depth 1 reaches 0.920"),
        ([0.92, 0.41, 0.12, 0.11], "at chance (so do the shortcuts of depth 3) while the shortcut of depth 1 reaches"),
        ([0.92, 0.10, 0.60], None),  # the full path answers: nothing to report
        ([0.25, 0.10], None),  # depth 1 has barely started: too early to say the deeper block lags
        ([0.10, 0.11], None),  # all at chance, but L_ae is not at the trivial loss: not this warning's case
    ],
)
@pytest.mark.parametrize("decodes", [None, False, True])
@pytest.mark.parametrize("warmed_up", [False, True])
def test_deeper_blocks_lagging_behind_a_good_shortcut_are_reported(accuracy, expected, decodes, warmed_up):
    from al_ext.collapse import collapse_warning
    warning = collapse_warning(0.05, accuracy, 10, "mse", label_side_ready=decodes, warmed_up=warmed_up)
    if expected is None:
        assert warning is None
    elif decodes:  # the label side tells the classes apart: the bridges lag, not it
        assert expected in warning and "the deeper bridges have yet to reach their codes" in warning
        assert "ZERO_CENTRED" not in warning and "label_warmup" not in warning
    else:
        assert expected in warning and "label_side=al_ext.label_side.ZERO_CENTRED" in warning
        assert ("label_warmup=True" in warning) is not warmed_up, "the warm-up is advised only where it has not run"


def test_two_classes_at_70_percent_are_not_called_chance():
    """1.5 x chance is 75 % on two classes: a full path at 70 % was reported as at chance."""
    from al_ext.collapse import chance_ceiling, collapse_warning
    assert [round(chance_ceiling(c), 3) for c in (2, 3, 4, 10, 100)] == [0.6, 0.433, 0.35, 0.15, 0.015]
    assert collapse_warning(0.05, [0.95, 0.70], 2, "mse") is None
    assert "the full path answers at chance" in collapse_warning(0.05, [0.95, 0.52], 2, "mse")


# ---- what the review found ---------------------------------------------------------------

@pytest.mark.parametrize("pipelined", [False, True])
def test_a_failing_should_abort_is_raised_and_ends_the_run(pipelined):
    model = small_mlp(hidden=(24, 16, 12))
    pipeline = Pipeline(model, Trainer(model, progress=False).optimizers, pipelined=pipelined)
    x, y = data(256)

    def should_abort():
        raise KeyError("the poll failed")

    with pytest.raises(KeyError, match="the poll failed"):
        pipeline.run([(x[i : i + 8], y[i : i + 8]) for i in range(0, 256, 8)], should_abort=should_abort)
    assert pipeline.run([(x[:8], y[:8])]).losses.shape == (1, 3, 2), "a later run works"


def test_a_dataloader_without_a_length_trains():
    x, y = data(64)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x.split(16), y.split(16)))

    for pipeline in (False, True):
        loader = DataLoader(Stream(), batch_size=None)
        history = Trainer(small_mlp(), pipeline=pipeline, progress=False).fit(loader, epochs=2)
        assert [r["epoch"] for r in history] == [1, 2]


def test_make_engine_checks_its_arguments():
    assert isinstance(make_engine(small_mlp(), "adamw", 1e-3, precision="bf16"), BF16_AL_ENGINE)
    with pytest.raises(ValueError, match="lr must be"):
        make_engine(small_mlp(), "adam", -1.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_engine(small_mlp(), "lbfgs", 1e-3)


def test_pipeline_stages_are_checked_and_bounded_by_the_blocks():
    model = small_mlp()
    optimizers = Trainer(model, progress=False).optimizers
    assert Pipeline(model, optimizers, stages=10).stages == model.depth
    for name in ("stages", "threads_per_stage"):
        with pytest.raises(ValueError, match=f"{name} must be"):
            Pipeline(model, optimizers, **{name: 0})
