"""Noticing a label side stuck at its trivial solution.

AL's first decoder h_1 reconstructs the one-hot labels. Early in training, or at a learning
rate too small for the batch size, it can settle on predicting the class frequencies for
every sample: L_ae of block 1 then sits at the loss of that constant prediction, and every
shortcut path, which decodes through h_1, answers at chance. Nothing fails; the run just
does not learn.

Deeper blocks can lag the same way while block 1 has learnt: each block's label encoder
g_i must keep the classes apart in t_i, and a sigmoid label side (NECO's) loses part of
their separation at every block (its outputs share a common offset), so the deeper
auto-encoders start on a longer plateau. The shallow shortcuts then answer well and the
full path, which decodes through every block, at chance. Once the label side does tell the
classes apart (al_ext.label_warmup trains it so before the first batch), a lagging full
path means the deeper bridges have yet to reach their codes. The Trainer checks after each
validation and says which.
"""
from __future__ import annotations

import math

# L_ae within this fraction of the constant prediction's loss counts as "at" it.
LOSS_TOLERANCE = 0.02
# Accuracy below this multiple of chance (1 / classes), and at most this far above chance,
# counts as "at chance" (chance_ceiling).
CHANCE_MULTIPLE = 1.5
CHANCE_MARGIN = 0.1
# A shortcut at this multiple of chance or more has clearly learnt: deeper blocks at chance lag it.
LEARNT_MULTIPLE = 3.0

WARMUP_ADVICE = "train the label side alone first (Trainer(label_warmup=True), the default for AL models); "
ADVICE = ("try first_ae_loss='cross_entropy' (it leaves the plateau sooner), a smaller batch, a larger ae_lr, or more "
          "epochs")
LABEL_LAG = "the deeper blocks' label side has not yet told the classes apart"
LAG_ADVICE = ("a zero-centred label side keeps the classes apart from block to block (label_side=al_ext.label_side."
              "ZERO_CENTRED, or the iclr22 preset's); else a smaller batch or more epochs")
BRIDGE_LAG = ("the label side tells every class apart at every depth, about as well at each, so the deeper bridges "
              "have yet to reach their codes; more epochs, or a smaller batch, give them the steps")


def chance_ceiling(num_classes: int) -> float:
    """The accuracy below which a path answers at chance: 1.5 x chance, but never more than
    10 points above it (on two classes 0.6, not 0.75: 70 % there has learnt something)."""
    chance = 1 / num_classes
    return min(CHANCE_MULTIPLE * chance, chance + CHANCE_MARGIN)


def trivial_ae_loss(num_classes: int, ae_loss: str) -> float:
    """Block 1's L_ae when h_1 predicts 1 / C for every class of a balanced one-hot target:
    MSE (1/C)(1 - 1/C); cross-entropy log C."""
    return math.log(num_classes) if ae_loss == "cross_entropy" else (1 / num_classes) * (1 - 1 / num_classes)


def collapse_warning(first_loss_ae: float, shortcut_accuracy: list[float], num_classes: int,
                     ae_loss: str, label_side_ready: bool | None = None, warmed_up: bool = False) -> str | None:
    """Why the label side looks collapsed, with what to try; None if it does not.
    ``label_side_ready``: whether the label side tells every class apart at every depth,
    about as well at each (al_ext.label_warmup.label_side_ready; None: not known here);
    ``warmed_up``: whether the label warm-up has run (then it is not advised)."""
    first_try = "" if warmed_up else WARMUP_ADVICE
    trivial = trivial_ae_loss(num_classes, ae_loss)
    at_trivial = abs(first_loss_ae - trivial) <= LOSS_TOLERANCE * trivial
    at_chance = [k for k, acc in enumerate(shortcut_accuracy, start=1) if acc < chance_ceiling(num_classes)]
    if at_trivial and 1 in at_chance:
        return (f"the label side looks stuck at its trivial solution: block 1's L_ae is {first_loss_ae:.4f}, what "
                f"predicting the class frequencies gives ({trivial:.4f}), and shortcut depths "
                f"{', '.join(map(str, at_chance))} answer at chance; {first_try}{ADVICE}")
    depth = len(shortcut_accuracy)
    lag = BRIDGE_LAG if label_side_ready else f"{LABEL_LAG}; {first_try}{LAG_ADVICE}"
    best = max(range(depth), key=lambda k: shortcut_accuracy[k])
    if depth in at_chance and shortcut_accuracy[best] >= min(LEARNT_MULTIPLE / num_classes, 0.9):
        shallower = [k for k in at_chance if k < depth]
        also = f" (so do the shortcuts of depth {', '.join(map(str, shallower))})" if shallower else ""
        return (f"the full path answers at chance{also} while the "
                f"shortcut of depth {best + 1} reaches {shortcut_accuracy[best]:.3f}: {lag}; meanwhile "
                f"model.predict(x, depth={best + 1}) answers")
    return None
