"""Presets build the authors' architectures: each one's parameter count equals the count of
the reference's layer list at the same widths, written out here from the reference code
(SamYWK/Associated_Learning for "neco", Hibb-bb/AL distributed_model.py for "iclr22"), and
the parts that differ from al_ext's defaults are the reference's."""
import inspect

import pytest
import torch
from torch import nn

import al_ext
from al_ext import presets
from al_ext.label_side import LabelSide
from al_ext.models import ALCNN, LSTM_AL, VGG_AL, ResNet_AL, Transformer_AL

# ---- the references' layers, counted as their code builds them ----------------------------

def dense(i, o):  # tf.layers.dense / nn.Linear: kernel and bias
    return i * o + o


def conv3x3(i, o):  # tf.layers.conv2d(kernel_size=3), bias on (TensorFlow's default)
    return 9 * i * o + o


def conv1x1(i, o):
    return i * o + o


def batch_norm(c):  # gamma and beta; the moving statistics are not trained
    return 2 * c


def bilstm(i, h):  # nn.LSTM(i, h, bidirectional=True): W_ih, W_hh, b_ih, b_hh per direction
    return 2 * (4 * h * i + 4 * h * h + 4 * h + 4 * h)


def neco_label_side(num_classes, n, blocks):
    """autoencoders(): y_0 = dense(C -> n), y_i = dense(n -> n); y_inv_0 = dense(n -> C), y_inv_i = dense(n -> n)."""
    return dense(num_classes, n) + dense(n, num_classes) + 2 * (blocks - 1) * dense(n, n)


def neco_bridge(features, n):
    """al_loss(): dense(flat -> 5n) + sigmoid, dense(-> n) + sigmoid."""
    return dense(features, 5 * n) + dense(5 * n, n)


def count(model):
    return sum(p.numel() for p in model.parameters())


def built(make):
    """Built on the meta device: the references' bridges take whole feature maps (up to 98 M
    weights in one layer), and a count needs no memory."""
    with torch.device("meta"):
        return make()


# ---- NECO (TensorFlow) --------------------------------------------------------------------

@pytest.mark.parametrize("n", [1024, 40])
def test_neco_mlp_counts_as_mlp_al(n):
    # MNIST/models.py MLP_AL: Layer_1 = dense(784 -> n), Layer_2 = dense(n -> n), a bridge on each.
    reference = dense(784, n) + dense(n, n) + 2 * neco_bridge(n, n) + neco_label_side(10, n, 2)
    model = built(lambda: al_ext.ALMLP(784, 10, preset="neco", hidden=(n, n), label_dim=n))
    assert count(model) == reference


@pytest.mark.parametrize("c1,c2,n", [(32, 64, 256), (6, 10, 24)])
def test_neco_cnn_counts_as_cnn_al(c1, c2, n):
    # MNIST/models.py CNN_AL on 28x28x1: convs c1 c1 | c1 c1/2 | c2 c2 | c2 c2/2, a bridge after each pair.
    convs = (conv3x3(1, c1) + conv3x3(c1, c1) + 2 * conv3x3(c1, c1) + conv3x3(c1, c2) + conv3x3(c2, c2)
             + 2 * conv3x3(c2, c2))
    bridges = sum(neco_bridge(f, n) for f in (c1 * 28 * 28, c1 * 14 * 14, c2 * 14 * 14, c2 * 7 * 7))
    model = built(lambda: ALCNN(preset="neco", channels=((c1, c1), (c1, c1), (c2, c2), (c2, c2)), label_dim=n))
    assert count(model) == convs + bridges + neco_label_side(10, n, 4)


@pytest.mark.parametrize("a,b,c,e,n", [(128, 256, 512, 1024, 300), (8, 12, 16, 20, 10)])
def test_neco_vgg_counts_as_vgg_al(a, b, c, e, n):
    # CIFAR10/models.py VGG_AL on 32x32x3, no batch norm: Layer_0 conv a, Layer_1 conv b, pool | Layer_2 conv b,
    # Layer_3 conv c, pool | Layer_4 conv c, pool, Layer_5 conv c, pool | Layer_6 dense(c*2*2 -> e), Layer_7 dense(e).
    x_side = (conv3x3(3, a) + conv3x3(a, b) + conv3x3(b, b) + conv3x3(b, c) + 2 * conv3x3(c, c)
              + dense(c * 2 * 2, e) + dense(e, e))
    bridges = sum(neco_bridge(f, n) for f in (b * 16 * 16, c * 8 * 8, c * 2 * 2, e))
    model = built(lambda: VGG_AL(preset="neco", stages=((a, b), (b, c), (c, "M", c)), head=(e, e), label_dim=n))
    assert model.depth == 4
    assert count(model) == x_side + bridges + neco_label_side(10, n, 4)


def neco_res_block(i, o, stride):
    # resBlock(): conv_layer_bn twice (conv with bias, batch norm), a 1x1 conv on the input where strides != 1.
    return conv3x3(i, o) + batch_norm(o) + conv3x3(o, o) + batch_norm(o) + (conv1x1(i, o) if stride != 1 else 0)


@pytest.mark.parametrize("depth,n", [(20, 300), (32, 300), (20, 12)])
def test_neco_resnet_counts_as_resnet_al(depth, n):
    # CIFAR10/models.py ResNet_AL: Layer_0 = conv 16 + BN (a block of its own), then stages 16, 32/2, 64/2 of
    # num_blocks units each; every block's output bridged, flattened.
    units = (depth - 2) // 6
    stem = conv3x3(3, 16) + batch_norm(16)
    stages, c_in = 0, 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        stages += neco_res_block(c_in, width, stride) + (units - 1) * neco_res_block(width, width, 1)
        c_in = width
    bridges = sum(neco_bridge(f, n) for f in (16 * 32 * 32, 16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8))
    model = built(lambda: ResNet_AL(depth, preset="neco", label_dim=n))
    assert model.depth == 4
    assert count(model) == stem + stages + bridges + neco_label_side(10, n, 4)


# ---- ICLR 2022 (PyTorch) ------------------------------------------------------------------

def iclr22_embedding_block(vocab, emb, lab, classes):
    # EMBLayer: ENC(f=Embedding, b=Linear(emb, lab) + tanh), AE(g=Linear(classes, lab) + tanh, h=Linear(lab, classes) + tanh)
    return vocab * emb + dense(emb, lab) + dense(classes, lab) + dense(lab, classes)


@pytest.mark.parametrize("vocab,emb,hid,lab,blocks", [(30000, 300, 128, 128, 2), (50, 12, 10, 6, 3)])
def test_iclr22_lstm_counts_as_lstm_model(vocab, emb, hid, lab, blocks):
    # LSTMModel: emb = EMBLayer; l1 = LSTMLayer(emb, lab, hid); l2 = LSTMLayer(2 hid, lab, hid). LSTMLayer:
    # ENC(f=LSTM(bidirectional), b=Linear(hid, lab) + tanh), AE(g=Linear(lab, lab) + tanh, h=Linear(lab, lab)).
    reference = iclr22_embedding_block(vocab, emb, lab, 4)
    for i in range(blocks):
        reference += bilstm(emb if i == 0 else 2 * hid, hid) + dense(hid, lab) + 2 * dense(lab, lab)
    model = built(lambda: LSTM_AL(vocab, 4, preset="iclr22", embed_dim=emb, hidden=(hid,) * blocks, label_dim=lab))
    assert model.depth == 1 + blocks
    assert count(model) == reference


def iclr22_transformer_encoder(d, ff):
    # transformer/encoder: MultiHeadAttention (4 Linear(d, d)), FeedForward (Linear(d, ff), Linear(ff, d)),
    # two SublayerConnection LayerNorms and the Encoder's closing LayerNorm (a and b each). TransformerEncoder
    # also keeps the template layer that clones() copied as a module of its own; it never runs, and is left out.
    layer_norm = 2 * d
    return 4 * dense(d, d) + dense(d, ff) + dense(ff, d) + 2 * layer_norm + layer_norm


@pytest.mark.parametrize("vocab,emb,ff,lab,heads,blocks", [(30000, 300, 256, 128, 4, 2), (50, 12, 10, 6, 2, 3)])
def test_iclr22_transformer_counts_as_trans_model(vocab, emb, ff, lab, heads, blocks):
    # TransModel: emb = EMBLayer; l1, l2 = TransLayer(emb, lab, l1_dim): ENC(f=TransformerEncoder(emb, l1_dim),
    # b=Linear(emb, lab) + tanh), AE(g=Linear(lab, lab) + tanh, h=Linear(lab, lab)).
    reference = iclr22_embedding_block(vocab, emb, lab, 4)
    reference += blocks * (iclr22_transformer_encoder(emb, ff) + dense(emb, lab) + 2 * dense(lab, lab))
    model = built(lambda: Transformer_AL(vocab, 4, preset="iclr22", dim=emb, feedforward=ff, heads=heads,
                                         num_blocks=blocks, label_dim=lab))
    assert model.depth == 1 + blocks
    assert count(model) == reference


# ---- what the presets change, and what they leave -----------------------------------------

def test_mlp_and_cnn_defaults_are_the_neco_presets():
    torch.manual_seed(0)
    default = al_ext.ALMLP(20, 5, hidden=(16, 12), label_dim=8)
    torch.manual_seed(0)
    neco = al_ext.ALMLP(20, 5, hidden=(16, 12), label_dim=8, preset="neco")
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), neco.state_dict().values()))
    assert default.uses_fused_step() and neco.uses_fused_step(), "the NECO MLP keeps the fused block step"
    assert presets.PRESETS["ALCNN"][None] is presets.neco_cnn


def test_neco_resnet_units_activate_before_the_sum():
    model = ResNet_AL(8, (3, 8, 8), preset="neco", widths=(4, 8, 8), label_dim=6)
    units = [m for m in model.modules() if isinstance(m, al_ext.residual_units.NecoResidualUnit)]
    assert len(units) == 3 and isinstance(units[0].body[-1], nn.ELU)
    assert isinstance(units[1].shortcut, nn.Conv2d), "a strided unit projects its input without batch norm"
    assert isinstance(model.blocks[0].b[0], nn.Flatten) and model.blocks[0].b[1].in_features == 4 * 8 * 8


def test_iclr22_label_side_and_bridges():
    model = LSTM_AL(40, 3, preset="iclr22", embed_dim=8, hidden=(6, 6), label_dim=5)
    first, later = model.blocks[0], model.blocks[1]
    assert [type(m) for m in first.h] == [nn.Linear, nn.Tanh] and model.first_ae_loss == "cross_entropy"
    assert [type(m) for m in later.h] == [nn.Linear], "later decoders are linear"
    assert [type(m) for m in later.g] == [nn.Linear, nn.Tanh]
    assert [type(m).__name__ for m in later.b] == ["FinalStatePool", "Linear", "Tanh"]
    assert later.f.lstm.bidirectional and first.f.tokens.padding_idx is None


def test_iclr22_lstm_hands_its_final_state_on():
    torch.manual_seed(0)
    model = LSTM_AL(40, 3, preset="iclr22", embed_dim=8, hidden=(6, 6), label_dim=5).eval()
    ids = torch.randint(1, 40, (4, 9))
    s1 = model.blocks[1].f(model.blocks[0].f(ids))
    assert s1.shape == (4, 9 + 2, 2 * 6 + 1), "positions, then h and c, then the mask channel"
    before = model.blocks[2].f(s1)
    changed = s1.clone()
    changed[:, -2:, :-1] += 1.0  # the final (h, c) alone
    after = model.blocks[2].f(changed)
    assert not torch.allclose(before[:, :9], after[:, :9]), "block 3's LSTM starts from block 2's final state"
    h = s1[:, -2, :-1]
    torch.testing.assert_close(model.blocks[1].b[0](s1), h[:, :6] + h[:, 6:])


def test_iclr22_transformer_has_no_positions_and_xavier_weights():
    torch.manual_seed(0)
    model = Transformer_AL(40, 3, preset="iclr22", dim=64, heads=4, feedforward=32, label_dim=5)
    assert model.blocks[0].f.positions is None
    q = model.blocks[1].f[0].layers[0].attention.q.weight
    bound = (6 / (64 + 64)) ** 0.5  # xavier_uniform_ of a 64 x 64 matrix
    assert q.abs().max() <= bound and q.abs().max() > 0.9 * bound


@pytest.mark.parametrize("init,std", [("he_normal", (2 / 200) ** 0.5), ("torch", (1 / 200 / 3) ** 0.5)])
def test_init_is_an_argument(init, std):
    torch.manual_seed(0)
    model = al_ext.ALMLP(200, 4, hidden=(300,), label_dim=300, init=init)
    w = model.blocks[0].f[1].weight  # PyTorch's default: uniform in +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)
    assert abs(w.std().item() - std) < 0.1 * std


def test_label_side_is_an_argument_of_every_family():
    side = LabelSide(activation="tanh", bridge_activation="tanh", bridge_layers=1, decoder_activation="identity")
    models = [al_ext.ALMLP(8, 3, hidden=(6, 6), label_dim=4, label_side=side),
              ALCNN((1, 8, 8), 3, channels=((2, 2), (2, 2)), strides=(1, 2), label_dim=4, label_side=side),
              VGG_AL((1, 8, 8), 3, stages=((2,), (2,)), label_dim=4, label_side=side),
              ResNet_AL(8, (1, 8, 8), 3, widths=(2, 2, 2), label_dim=4, label_side=side),
              LSTM_AL(20, 3, embed_dim=4, hidden=(4, 4), label_dim=4, label_side=side),
              Transformer_AL(20, 3, dim=4, heads=2, feedforward=4, label_dim=4, label_side=side)]
    for model in models:
        later = model.blocks[1]
        assert isinstance(later.g[-1], nn.Tanh) and [type(m) for m in later.h] == [nn.Linear], type(model).__name__
        assert isinstance(later.b[-1], nn.Tanh) and sum(isinstance(m, nn.Linear) for m in later.b) == 1
    assert not models[0].uses_fused_step(), "a tanh label side takes the general path"


def test_every_preset_names_its_reference():
    for family, table in presets.PRESETS.items():
        for name, make in table.items():
            if name is not None:
                doc = inspect.getdoc(make)
                assert "github" not in doc.lower() and ("models.py" in doc or "distributed_model.py" in doc), family


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: al_ext.ALMLP(8, 3, preset="iclr22"), ValueError, "ALMLP has the preset 'neco'"),
        (lambda: LSTM_AL(20, 3, preset="neco"), ValueError, "LSTM_AL has the preset 'iclr22'"),
        (lambda: LSTM_AL(20, 3, hidden=(4, 6), pass_state=True), ValueError, "every width must be the same"),
        (lambda: al_ext.ALMLP(8, 3, label_side="tanh"), TypeError, "label_side must be an al_ext.label_side.LabelSide"),
        (lambda: LabelSide(activation="softmax"), ValueError, "label_side.activation must be one of"),
        (lambda: LabelSide(bridge_layers=3), ValueError, "bridge_layers must be 1 or 2"),
        (lambda: al_ext.ALMLP(8, 3, init="xavier"), ValueError, "init must be one of 'he_normal', 'torch'"),
        (lambda: VGG_AL((1, 8, 8), stages=(("M",),)), ValueError, "each with at least one convolution width"),
        (lambda: Transformer_AL(20, 3, encoder_layer="keras"), ValueError, "encoder_layer must be one of"),
        (lambda: presets.training_settings("bp"), ValueError, "preset must be one of 'neco', 'iclr22'"),
    ],
)
def test_bad_preset_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_training_settings_scale_by_the_square_root_of_the_batch():
    assert presets.training_settings("neco") == {"lr": 1e-4, "ae_lr": 2e-4, "batch_size": 32}
    assert presets.training_settings("neco", family=VGG_AL) == {"lr": 1e-4, "ae_lr": 2e-4, "batch_size": 32}
    scaled = presets.training_settings("iclr22", 256)
    assert scaled["batch_size"] == 256 and abs(scaled["lr"] - 2e-3) < 1e-12 and abs(scaled["ae_lr"] - 2e-3) < 1e-12


def test_the_neco_resnet_takes_the_rate_its_reference_starts_it_at():
    # CIFAR10/main.py: lr = 1e-3 for every model whose name begins "ResNet", the AL ones too.
    assert presets.training_settings("neco", family=ResNet_AL) == {"lr": 1e-3, "ae_lr": 2e-3, "batch_size": 32}
    scaled = presets.training_settings("neco", 128, family=ResNet_AL)
    assert abs(scaled["lr"] - 2e-3) < 1e-12 and abs(scaled["ae_lr"] - 4e-3) < 1e-12


def test_the_family_may_be_the_model_or_a_subclass():
    class MyResNet(ResNet_AL):
        pass

    want = presets.training_settings("neco", family=ResNet_AL)
    assert presets.training_settings("neco", family=MyResNet) == want
    assert presets.training_settings("neco", family=ResNet_AL(8, (1, 8, 8), 3, widths=(2, 2, 2), label_dim=4)) == want
