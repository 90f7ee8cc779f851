"""LSTM_AL and Transformer_AL: padding never changes a result, they learn a generated text
task, and they work with every inference path, the BP baseline and the pipeline."""
import itertools
import unittest.mock

import pytest
import torch

import al_ext
from al_ext import Trainer, bp_baseline, sequence_layers, text
from al_ext.models import LSTM_AL, Transformer_AL
from al_ext.sequence_layers import MaskedTransformerLayer, PreNormTransformer, split


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


def padded_state(n_features: int) -> torch.Tensor:
    mask = (torch.arange(7) < torch.tensor([[7], [2], [1]])).float().unsqueeze(-1)
    return torch.cat([torch.randn(3, 7, n_features), mask], dim=-1).requires_grad_()


def torchs_layer(layer: MaskedTransformerLayer):
    """torch's nn.TransformerEncoderLayer called on the layer's weights, as the layer called it before."""
    def forward(state):
        features, mask = split(state)
        padding = mask[..., 0] == 0
        padding[:, 0] = False
        return torch.cat([layer.layer(features, src_key_padding_mask=padding) * mask, mask], dim=-1)
    return forward


def outputs_and_grads(fn, state, params, bf16=False, seed=1):
    torch.manual_seed(seed)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = fn(state)
    return [out.float(), *torch.autograd.grad(out.float().square().sum(), [state, *params])]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["train", "eval", "eval without autograd"])
def test_masked_transformer_layer_computes_torchs_layer(dropout, mode):
    # Its own attention forward must give what torch's nn.TransformerEncoderLayer gives on the same weights,
    # dropout draws included, and the same gradients (to rounding: the q/k/v gradients are stacked, not summed).
    torch.manual_seed(0)
    layer = MaskedTransformerLayer(16, 4, 24, dropout).train(mode == "train")
    state = padded_state(16)
    if mode == "eval without autograd":  # torch's layer itself, for its fused inference kernel
        with torch.no_grad(), unittest.mock.patch.object(layer, "_encoder_layer", side_effect=AssertionError):
            layer(state)
        return
    params = list(layer.parameters())
    for a, b in zip(outputs_and_grads(layer, state, params), outputs_and_grads(torchs_layer(layer), state, params)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_masked_transformer_layer_follows_norm_first_and_hooks():
    torch.manual_seed(0)
    layer = MaskedTransformerLayer(16, 4, 24)
    layer.layer.norm_first = True  # pre-norm, as torch's layer computes it
    state, params = padded_state(16), list(layer.parameters())
    for a, b in zip(outputs_and_grads(layer, state, params), outputs_and_grads(torchs_layer(layer), state, params)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    calls = []
    layer.layer.self_attn.register_forward_pre_hook(lambda module, inputs: calls.append(module))  # as pruning does
    layer(state)
    assert calls == [layer.layer.self_attn]


def attend_in_bf16(q, k, v, mask, dropout_p):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@pytest.mark.parametrize("layer", ["MaskedTransformerLayer", "PreNormTransformer"])
def test_attention_layers_under_autocast_bf16_stay_close_to_float32(layer):
    # On the CPU the attention itself runs in float32 under bf16 (al_ext.sequence_layers.attend): the result
    # must be no further from float32 than the layer with every op in bf16 is (the architecture's rule: at
    # most 2x its error).
    torch.manual_seed(0)
    model = MaskedTransformerLayer(16, 4, 24) if layer == "MaskedTransformerLayer" else \
        PreNormTransformer(16, 4, 24, layers=2, dropout=0.0)
    state, params = padded_state(16), list(model.parameters())
    exact = outputs_and_grads(model, state, params)
    ours = outputs_and_grads(model, state, params, bf16=True)
    with unittest.mock.patch.object(sequence_layers, "attend", attend_in_bf16):
        all_bf16 = outputs_and_grads(model, state, params, bf16=True)
    assert not torch.equal(ours[0], all_bf16[0])
    for e, a, b in zip(exact, ours, all_bf16):
        assert (a - e).abs().max() <= 2 * (b - e).abs().max() + 1e-6


def test_attend_runs_bf16_attention_in_float32_on_the_cpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    keep = torch.rand(2, 1, 1, 5) > 0.3
    keep[..., 0] = True
    with torch.autocast("cpu", torch.bfloat16):
        out = sequence_layers.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep, 0.0)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(),
                                                                v.bfloat16().float(), attn_mask=keep)
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(sequence_layers.attend(q, k, v, keep, 0.0),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep))


@pytest.mark.parametrize("preset", [None, "iclr22"])
def test_every_lstm_layout_takes_a_batch_of_no_rows(preset):
    """A data-parallel replica's share of a last batch smaller than the replicas is empty, and
    its blocks still hand on a (0, ...) state of the right shape."""
    for mask, bidirectional, pass_state, bridge in itertools.product((True, False), (False, True), (False, True),
                                                                     ("final_state", "mean")):
        model = LSTM_AL(10, 2, preset=preset, hidden=(4, 4), embed_dim=4, label_dim=4, mask_padding=mask,
                        bidirectional=bidirectional, pass_state=pass_state, bridge_input=bridge)
        s, t = torch.randint(1, 10, (3, 5)), torch.zeros(3, 2)
        with torch.no_grad():
            for block in model.blocks:
                empty = block.f(s[:0])
                s, t = block.f(s), block.g(t)
                assert empty.shape == (0, *s.shape[1:]) and block.b(empty).shape[0] == 0
