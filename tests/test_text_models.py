"""LSTM_AL and Transformer_AL: padding never changes a result, they learn a generated text
task, and they work with every inference path, the BP baseline and the pipeline."""
import pytest
import torch

import al_ext
from al_ext import Trainer, bp_baseline, text
from al_ext.models import LSTM_AL, Transformer_AL
from al_ext.sequence_layers import MaskedTransformerLayer, split


@pytest.fixture(scope="module")
def task():
    texts, labels = text.generated_topics(1200, seed=0)
    vocab = text.Vocabulary(texts)
    parts = al_ext.data.split_dataset(vocab.encode(texts, 24), labels, val=0.1, test=0.2, seed=0)
    return vocab, parts


def make(kind, vocab_size, **kwargs):
    torch.manual_seed(0)
    if kind.endswith("iclr22"):  # the authors' architecture at small widths; no dropout, so runs compare exactly
        kwargs = dict(preset="iclr22", **kwargs)
        if kind.startswith("lstm"):
            return LSTM_AL(vocab_size, 4, embed_dim=16, hidden=(24, 24), label_dim=16, **kwargs)
        return Transformer_AL(vocab_size, 4, dim=16, heads=2, feedforward=32, label_dim=16, dropout=0.0, **kwargs)
    if kind == "lstm":
        return LSTM_AL(vocab_size, 4, embed_dim=32, hidden=(48, 48), label_dim=32, bridge_factor=2, **kwargs)
    return Transformer_AL(vocab_size, 4, max_len=32, dim=32, heads=2, feedforward=64, label_dim=32, bridge_factor=2,
                          **kwargs)


KINDS = ["lstm", "transformer"]
ALL_KINDS = KINDS + ["lstm iclr22", "transformer iclr22"]


@pytest.mark.parametrize("kind,options", [(k, {}) for k in KINDS] + [(k, {"mask_padding": True}) for k in ALL_KINDS[2:]])
def test_padding_changes_nothing(kind, options):
    model = make(kind, 50, **options).eval()
    ids = torch.randint(1, 50, (3, 10))
    padded = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded), model(ids))
    for a, b in zip(model.shortcut_scores(padded), model.shortcut_scores(ids)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_learns_the_generated_task(kind, task):
    vocab, parts = task
    trainer = Trainer(make(kind, len(vocab), first_ae_loss="cross_entropy"), lr=3e-3, batch_size=32, progress=False)
    trainer.fit(parts.train, parts.val, epochs=8)
    assert max(trainer.evaluate(parts.test)["shortcut_accuracy"]) > 0.7  # chance is 0.25


@pytest.mark.parametrize("kind", ALL_KINDS[2:])
def test_iclr22_models_read_padding_as_their_code_does(kind):
    # The reference's embedding block averages the embeddings over every position (the shortcut of depth 1
    # reads it), and its LSTMs run over the padding (every LSTM block's result).
    model = make(kind, 50).eval()
    ids = torch.randint(1, 50, (3, 10))
    padded = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    assert not torch.allclose(model.scores(padded, depth=1), model.scores(ids, depth=1))
    assert torch.allclose(model(padded), model(ids)) == kind.startswith("transformer")  # attention skips padding


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_inference_paths_and_bp_baseline(kind):
    model = make(kind, 50).eval()
    ids = torch.randint(0, 50, (5, 12))
    classes, depths = model.predict_adaptive(ids, 0.5)
    assert classes.shape == (5,) and 1 <= int(depths.min()) and int(depths.max()) <= model.depth
    assert torch.equal(model.predict(ids, depth=1), model.scores(ids, depth=1).argmax(1))
    # bp_baseline drops a sigmoid on h_1 (cross-entropy then sees logits); the ICLR 2022 tanh stays, as in their code
    squash = torch.sigmoid if kind in KINDS else (lambda z: z)
    torch.testing.assert_close(squash(bp_baseline(model).eval()(ids)), model(ids))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_text_models_pipeline_bit_for_bit(kind, task):
    vocab, parts = task
    x, y = parts.train[0][:96], parts.train[1][:96]
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for pipelined in (False, True):
            model = make(kind, len(vocab))
            Trainer(model, batch_size=16, progress=False, pipeline=pipelined, threads_per_stage=1,
                    pipeline_stages=2 if pipelined else None).fit((x, y), epochs=1)
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    "ids,error,message",
    [
        (torch.rand(2, 5), TypeError, "must hold integer token ids"),
        (torch.tensor([[1, 2, 50]]), ValueError, r"token ids must lie in \[0, 50\), got values from 1 to 50"),
        (torch.tensor([1, 2, 3]), ValueError, r"non-empty \(batch, length\) tensor"),
    ],
)
def test_bad_token_input(ids, error, message):
    with pytest.raises(error, match=message):
        make("lstm", 50)(ids)
    with pytest.raises(error, match=message):
        Trainer(make("lstm", 50), progress=False).fit((ids, torch.zeros(ids.shape[0], dtype=torch.long)), epochs=1)


def test_generated_topics_is_seeded_and_balanced():
    a, b = text.generated_topics(400, seed=3), text.generated_topics(400, seed=3)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert text.generated_topics(400, seed=4)[0] != a[0]
    assert torch.bincount(a[1], minlength=4).min() > 60
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        text.generated_topics(10, num_classes=1)


def test_transformer_arguments():
    with pytest.raises(ValueError, match=r"dim \(30\) must be a multiple of heads \(4\)"):
        Transformer_AL(50, 4, dim=30)
    with pytest.raises(ValueError, match="exceed max_len 8"):
        Transformer_AL(50, 4, max_len=8, dim=16, heads=2)(torch.ones(2, 9, dtype=torch.long))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["train", "eval", "eval without autograd", "train under autocast bf16"])
def test_masked_transformer_layer_computes_torchs_layer(dropout, mode):
    # Its own attention forward must give what torch's nn.TransformerEncoderLayer gives on the same weights,
    # dropout draws included, and the same gradients (to rounding: the q/k/v gradients are stacked, not summed).
    torch.manual_seed(0)
    layer = MaskedTransformerLayer(16, 4, 24, dropout).train(mode.startswith("train"))
    h = torch.randn(3, 7, 16)
    mask = (torch.arange(7) < torch.tensor([[7], [2], [1]])).float().unsqueeze(-1)
    state = torch.cat([h, mask], dim=-1).requires_grad_(mode != "eval without autograd")

    def torchs(state):
        features, mask = split(state)
        padding = mask[..., 0] == 0
        padding[:, 0] = False
        return torch.cat([layer.layer(features, src_key_padding_mask=padding) * mask, mask], dim=-1)

    with torch.autocast("cpu", torch.bfloat16, enabled="autocast" in mode), \
            torch.set_grad_enabled(mode != "eval without autograd"):
        outs = []
        for fn in (layer, torchs):
            torch.manual_seed(1)
            outs.append(fn(state))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=0)
    if state.requires_grad:
        weights = [state, *layer.parameters()]
        ours, theirs = (torch.autograd.grad(out.float().square().sum(), weights) for out in outs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-2 if "autocast" in mode else 1e-5, rtol=1e-3)
