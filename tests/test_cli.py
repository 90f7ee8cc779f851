"""The al-ext console script, end to end."""
import gzip
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

import al_ext

from al_ext.cli import build_parser

AL_EXT = shutil.which("al-ext")
pytestmark = pytest.mark.skipif(AL_EXT is None, reason="the al-ext console script is not installed")


def run(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([AL_EXT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_help_explains_every_option():
    assert run("--help").returncode == 0
    result = run("train", "--help")
    assert result.returncode == 0
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.values())
    for action in train._actions:
        for flag in action.option_strings:
            assert flag in result.stdout
        assert action.help, f"{action.option_strings} has no help"


def test_train_on_digits_and_compare_with_bp(tmp_path):
    out = tmp_path / "result.json"
    result = run("train", "--dataset", "digits", "--epochs", "6", "--batch-size", "16", "--compare-bp", "--hidden", "64,64",
                 "--label-dim", "64", "--bridge-factor", "2", "--first-ae-loss", "cross_entropy",
                 "--json", str(out), "--save", str(tmp_path / "al.pt"))
    assert result.returncode == 0, result.stderr
    assert "1258 train / 180 val / 359 test" in result.stdout
    assert result.stdout.count("AL epoch") == 6 and result.stdout.count("BP epoch") == 6
    assert result.stdout.count("label warm-up") == 1, "said once, on AL's first epoch"
    assert "AL - BP test accuracy" in result.stdout
    report = json.loads(out.read_text())
    for name in ("AL", "BP"):
        r = report["results"][name]
        assert 0.5 < r["test_accuracy"] <= 1 and r["samples_per_s"] > 0 and len(r["history"]) == 6
        assert "best_val" in r and "test_accuracy_at_best_val" in r
    assert len(report["results"]["AL"]["test_shortcut_accuracy"]) == 2
    assert report["split"]["train"] + report["split"]["val"] + report["split"]["test"] == 1797
    assert (tmp_path / "al.pt").is_file()


def test_save_writes_the_final_state_and_save_best_the_best_weights(tmp_path):
    result = run("train", "--dataset", "digits", "--epochs", "3", "--batch-size", "32", "--hidden", "32,32",
                 "--label-dim", "32", "--bridge-factor", "2", "--optimizer", "adamw", "--weight-decay", "0.001",
                 "--schedule", "onecycle", "--save", str(tmp_path / "final.pt"), "--save-best", str(tmp_path / "best.pt"),
                 "--log-dir", str(tmp_path / "logs"), "--no-progress", "--no-label-warmup")
    assert result.returncode == 0, result.stderr
    model = al_ext.ALMLP(64, 10, hidden=(32, 32), label_dim=32, bridge_factor=2)
    onecycle = lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731 - as the CLI builds it
        opt, max_lr=[10 * g["lr"] for g in opt.param_groups], total_steps=120, cycle_momentum=False)
    trainer = al_ext.Trainer(model, optimizer="adamw", scheduler=onecycle, progress=False)
    trainer.load(tmp_path / "final.pt")  # the run's last state, resumable, not the best epoch's weights
    assert trainer.epoch == 3 and len(trainer.history) == 3 and trainer.global_step == 3 * 40
    assert trainer.label_warmup_result is None and "label warm-up" not in result.stdout  # --no-label-warmup
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert set(best) == set(model.state_dict())
    steps = (tmp_path / "logs" / "AL" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 3 * 40 and (tmp_path / "logs" / "AL" / "epochs.csv").is_file()
    lrs = [json.loads(line)["lr"] for line in steps]
    assert max(lrs) > 5 * lrs[0], "onecycle warms the rate up batch by batch"


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_train_pipelined_with_sgd(tmp_path):
    out = tmp_path / "result.json"
    result = run("train", "--dataset", "digits", "--epochs", "2", "--hidden", "32,32,32", "--label-dim", "16",
                 "--bridge-factor", "2", "--pipeline", "--optimizer", "sgd", "--lr", "0.05", "--no-progress",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    history = json.loads(out.read_text())["results"]["AL"]["history"]
    assert len(history) == 2 and "stage_idle_fraction" in history[0]


@pytest.mark.parametrize("model", ["cnn", "resnet20"])
def test_train_a_conv_model(model):
    result = run("train", "--dataset", "digits", "--model", model, "--epochs", "1", "--label-dim", "16",
                 "--bridge-factor", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("AL epoch") == 1


def test_train_a_text_model_on_generated_text():
    result = run("train", "--dataset", "generated-text", "--model", "lstm", "--hidden", "32", "--label-dim", "16",
                 "--bridge-factor", "2", "--max-len", "16", "--epochs", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "6000 samples, 4 classes" in result.stdout and result.stdout.count("AL epoch") == 1


def test_train_a_text_model_on_ag_news_csv(tmp_path):
    rows = [f'"{1 + i % 4}","title {i % 4}","words of class {i % 4} and filler {i}"' for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = run("train", "--dataset", f"ag_news:{tmp_path / 'train.csv'}", "--model", "transformer", "--hidden",
                 "16", "--label-dim", "8", "--bridge-factor", "2", "--max-len", "12", "--epochs", "1",
                 "--test", "8", "--val", "0", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "32 train / 0 val / 8 test" in result.stdout


def test_a_preset_builds_the_authors_model_and_takes_their_settings(tmp_path):
    out = tmp_path / "result.json"
    result = run("train", "--dataset", "generated-text", "--model", "lstm", "--preset", "iclr22", "--hidden", "16,16",
                 "--label-dim", "8", "--max-len", "12", "--epochs", "1", "--batch-size", "256", "--no-progress",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    texts, labels = al_ext.text.generated_topics(6000, seed=0)  # the vocabulary the command line builds
    train = al_ext.data.stratified_split(labels, val=0.1, test=0.2, seed=0).train
    vocab_size = len(al_ext.text.Vocabulary([texts[i] for i in train.tolist()]))
    expected = al_ext.models.LSTM_AL(vocab_size, 4, preset="iclr22", hidden=(16, 16), label_dim=8)
    assert report["results"]["AL"]["parameters"] == sum(p.numel() for p in expected.parameters())
    assert report["training"] == al_ext.presets.training_settings("iclr22", 256)  # 1e-3 at 64, scaled to 256
    assert result.stdout.count("L_as ") == 1 and len(report["results"]["AL"]["history"][0]["loss_as"]) == 3


@pytest.mark.parametrize("args,message", [
    (["--dataset", "generated-text", "--model", "lstm", "--preset", "neco"], "LSTM_AL has the preset 'iclr22'"),
    (["--dataset", "digits", "--model", "lstm"], "--model lstm needs a text dataset"),
    (["--dataset", "generated-text", "--model", "cnn"], "--model cnn needs an image dataset"),
])
def test_model_and_dataset_must_agree(args, message):
    result = run("train", "--epochs", "1", *args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("first_label", [0, 1])
def test_train_on_idx_files(tmp_path, first_label):
    rng = np.random.default_rng(0)
    labels = (np.arange(60, dtype=np.uint8) % 3 + first_label).astype(np.uint8)
    images = (rng.random((60, 4, 4)) * 60 + labels[:, None, None] * 60).astype(np.uint8)
    write_idx(tmp_path / "img.gz", images, 0x08)
    write_idx(tmp_path / "lab.gz", labels, 0x08)
    result = run("train", "--dataset", f"idx:{tmp_path / 'img.gz'},{tmp_path / 'lab.gz'}", "--epochs", "2",
                 "--hidden", "8", "--label-dim", "4", "--val", "0", "--test", "12", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "48 train / 0 val / 12 test" in result.stdout
    # labels counted from 1: a class 0 that nothing trains, said so
    assert ("warning: no sample has label 0 (the model has 4 classes" in result.stdout) is (first_label == 1)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "cifar"], "--dataset must be"),
        (["--hidden", "8,x"], "expected comma-separated positive integers"),
        (["--variant", "C"], "invalid choice: 'C'"),
        (["--lr", "-1"], "lr must be a positive finite number"),
        (["--test", "0.9", "--val", "0.2"], "leave no training samples"),
        (["--cuda-graphs"], "cuda_graphs=True replays the pipeline's block steps; it needs pipeline=True"),
        (["--cuda-graphs", "--pipeline"], "cuda_graphs=True replays fused block steps on CUDA"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer of at least 1, got '0'"),
        (["--epochs", "-1"], "argument --epochs: expected an integer of at least 1"),
        (["--vocab-size", "2"], "argument --vocab-size: expected an integer of at least 3"),
        (["--save", "/no/such/folder/run.pt"], "--save: the folder '/no/such/folder'"),
        (["--json", "/no/such/folder/run.json"], "--json: the folder '/no/such/folder'"),
        (["--save-best", "/no/such/folder/best.pt"], "save_best: the folder '/no/such/folder'"),
        (["--val", "0", "--save-best", "best.pt"], "save_best needs val="),
        (["--seed", "-1"], "argument --seed: expected an integer of at least 0"),
        (["--model", "cnn"], "--hidden sets the widths of --model mlp and lstm"),
        (["--log-dir", __file__], "--log-dir must name a folder (made if missing), got the file"),
    ],
)
def test_bad_arguments_are_reported_without_a_traceback(args, message):
    result = run("train", "--epochs", "1", "--hidden", "8", "--label-dim", "4", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_corrupt_idx_file_is_reported(tmp_path):
    (tmp_path / "img").write_bytes(b"\0\0\x08\x03" + b"\0\0\0\x05" * 3 + b"\1" * 7)
    (tmp_path / "lab").write_bytes(b"\0\0\x08\x01\0\0\0\x05" + b"\1" * 5)
    result = run("train", "--dataset", f"idx:{tmp_path / 'img'},{tmp_path / 'lab'}", "--epochs", "1")
    assert result.returncode == 2
    assert "truncated" in result.stderr and "Traceback" not in result.stderr


def test_an_empty_idx_file_is_reported(tmp_path):
    (tmp_path / "img").write_bytes(b"\0\0\x08\x03" + b"\0\0\0\x00" + b"\0\0\0\x05" * 2)
    (tmp_path / "lab").write_bytes(b"\0\0\x08\x01\0\0\0\x00")
    result = run("train", "--dataset", f"idx:{tmp_path / 'img'},{tmp_path / 'lab'}", "--epochs", "1")
    assert result.returncode == 2
    assert "holds no images" in result.stderr and "Traceback" not in result.stderr


def test_a_resumed_run_whose_best_epoch_came_before_says_so(tmp_path):
    base = ["train", "--dataset", "digits", "--batch-size", "64", "--hidden", "8", "--label-dim", "8",
            "--no-progress", "--no-label-warmup"]
    first = run(*base, "--epochs", "1", "--save", str(tmp_path / "run.pt"))
    assert first.returncode == 0, first.stderr
    resumed = run(*base, "--epochs", "1", "--resume", str(tmp_path / "run.pt"), "--json", str(tmp_path / "run.json"))
    assert resumed.returncode == 0, resumed.stderr
    assert "its weights were not saved (--save-best)" in resumed.stdout
    assert "best_val" in json.loads((tmp_path / "run.json").read_text())["results"]["AL"]


@pytest.mark.parametrize("model,lr", [("resnet20", 1e-3), ("resnet32", 1e-3), ("vgg", 1e-4), ("cnn", 1e-4)])
def test_the_neco_preset_takes_each_familys_reference_rate(model, lr):
    from al_ext.cli import build_parser, training_options
    args = build_parser().parse_args(["train", "--model", model, "--preset", "neco"])
    assert training_options(args) == {"lr": lr, "ae_lr": 2 * lr, "batch_size": 32}
