"""Cases shared by the bit-exact resume test and the DDP test.

Every stateful part of lit_tricks registers a case here: a function that builds, from scratch and with the
global seed already set, ``(module, datamodule, callbacks)`` for a short run. The harnesses then check that
fit(N) equals fit(N/2) + resume(N) and a resume from a mid-epoch checkpoint bit for bit, and that two DDP
ranks agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_tricks import (
    ELR,
    Classifier,
    ConceptBottleneckModel,
    ConceptEmbeddingModel,
    ConsistencyModel,
    ContinualEvaluation,
    DataDietScores,
    EMATeacher,
    ExperienceReplay,
    Mixup,
    PostHocCBM,
    SampleReweighting,
    SelectiveBackprop,
    SelfDistill,
    Trick,
)
from lit_tricks.data import (
    ArrayDataModule,
    ConceptToyDataModule,
    ContinualDataModule,
    DigitsDataModule,
    ShapesDataModule,
    Toy2DDataModule,
)
from lit_tricks.modules import SparseCBM
from lit_tricks.nets import CNN2D, MLP, TimeMLP

Build = Callable[[], tuple[pl.LightningModule, pl.LightningDataModule, list[Callback]]]
CASES: dict[str, Build] = {}


def tear_down_process_group() -> None:
    """End a DDP script's process group before the interpreter exits: left to exit-time destructors, gloo's
    threads occasionally abort the process ("terminate called without an active exception") after a good run."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def case(name: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES[name] = build
        return build

    return register


@case("classifier_mlp_dropout")
def _classifier_mlp():
    # dropout makes the run depend on the global RNG, which the resume must restore
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.3), num_classes=10)
    return model, DigitsDataModule(batch_size=32), []


@case("classifier_cnn_batchnorm")
def _classifier_cnn():
    model = Classifier(
        CNN2D(num_classes=10, width=8),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    return model, DigitsDataModule(batch_size=32, as_image=True), []


@case("ema_teacher")
def _ema_teacher():
    # averaged BatchNorm buffers and a warm-up: every piece of EMA state must survive the resume
    model = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    ema = EMATeacher(decay=0.9, warmup=True, buffers="average", start_step=2)
    return model, DigitsDataModule(batch_size=32, as_image=True), [ema]


@case("self_distill_pskd")
def _pskd():
    # the per-sample prediction table must survive the resume and be filled from both DDP ranks
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    return model, DigitsDataModule(batch_size=32), [SelfDistill("past_predictions", total_epochs=2)]


@case("self_distill_ema")
def _ema_kd():
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    tricks = [EMATeacher(decay=0.9), SelfDistill("ema", temperature=2.0, rampup_steps=4)]
    return model, DigitsDataModule(batch_size=32), tricks


@case("mixup_cutmix_switch")
def _mixup():
    # the private generator (pairs, lambdas, boxes, switches) must continue exactly after the resume
    model = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    mixing = Mixup(alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, mode="elem", label_smoothing=0.1, seed=7)
    return model, DigitsDataModule(batch_size=32, as_image=True), [mixing]


@case("elr_noisy_labels")
def _elr():
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    return model, DigitsDataModule(batch_size=32, label_noise=0.4), [ELR(beta=0.7, lam=3.0)]


class RecordWeights(Trick):
    """Keeps each step's per-sample losses and final weights on this rank (in ``records``, not in the state)."""

    order = 100

    def __init__(self) -> None:
        self.records: list[dict[str, torch.Tensor]] = []

    def after_loss(self, trainer, module, batch, out):
        self.records.append({"loss": out.per_sample_loss.detach().clone(), "weight": batch.weight.clone()})
        return out


@case("sample_reweighting")
def _reweighting():
    # under DDP the weights come from the all-gathered global batch
    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    tricks = [SampleReweighting("quadratic", 0.5), RecordWeights()]
    return model, DigitsDataModule(batch_size=32, label_noise=0.2), tricks


@case("selective_backprop_rs2")
def _selective_backprop_rs2():
    # the draw generator and the RS2 subsets (a function of the epoch) must continue exactly; batch norm's
    # running statistics must see only the training forward passes
    model = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    datamodule = DigitsDataModule(batch_size=32, as_image=True, rs2_fraction=0.5)
    return model, datamodule, [SelectiveBackprop(keep=0.5, start=0.0, end=1.0, interrupt=3, seed=3)]


@case("data_diet_scores")
def _data_diet():
    # the scores are taken after epoch 1, so the resumed run has them only from the checkpoint
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=32), [DataDietScores("el2n", epoch=1)]


@case("continual_replay")
def _continual():
    # batches of 64 cross from task 0 into task 1 within the 5 batches of an epoch: the evaluation history,
    # the current task and the reservoir memory must all survive the resume; under DDP the memory is one
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    stream = ContinualDataModule(DigitsDataModule(batch_size=64), num_tasks=5)
    return model, stream, [ExperienceReplay(memory_size=100, seed=1), ContinualEvaluation(every_n_steps=2)]


@case("consistency_moons")
def _consistency():
    # the curriculum (from global_step), the noise and dropout draws, the EMA and the samplers' validation
    # (total_steps pins the curriculum's K: the 1-epoch "half" run must follow the 2-epoch schedule)
    net = TimeMLP(dim=2, hidden=32, dropout=0.1)
    model = ConsistencyModel(net, data_shape=[2], s1=40, total_steps=10, num_eval_samples=128)
    return model, Toy2DDataModule(num_samples=1024, batch_size=64, eval_samples=128), []


@case("concept_bottleneck_logit")
def _cbm():
    # a logit bottleneck computes its intervention percentiles when training ends; dropout draws the global RNG
    encoder = torch.nn.Sequential(
        torch.nn.Linear(7, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3)
    )
    model = ConceptBottleneckModel(encoder, torch.nn.Linear(3, 2), n_concepts=3, bottleneck="logit")
    return model, ConceptToyDataModule("trig", num_samples=800, batch_size=64), []


@case("concept_embedding_shapes")
def _cem():
    # RandInt draws one intervention mask per batch from the global RNG; concept groups; validation metrics
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 32), torch.nn.ReLU())
    model = ConceptEmbeddingModel(encoder, n_concepts=12, n_tasks=9, latent_dim=32, emb_size=4,
                                  concept_groups=ShapesDataModule.concept_groups)  # fmt: skip
    return model, ShapesDataModule(num_samples=600, batch_size=64), []


class _Features(ArrayDataModule):
    """Fixed random features (embeddings or concept similarities) with labels from their first dimensions."""

    num_classes = 3

    def load_arrays(self):
        x = torch.randn(600, 8, generator=torch.Generator().manual_seed(0))
        y = x[:, :3].argmax(dim=1)
        return x[:500], y[:500], x[500:], y[500:]


@case("post_hoc_cbm")
def _pcbm():
    # the proximal l1 step after each SGD step; a concept bank of random directions
    bank = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    return PostHocCBM(bank, n_classes=3, lam=0.05, lr=0.1), _Features(batch_size=50, val_fraction=0.2), []


@case("sparse_cbm_gumbel")
def _sparse_cbm():
    # the Gumbel-softmax concept loss draws the global RNG
    return SparseCBM(8, 3, lr=1e-2), _Features(batch_size=50, val_fraction=0.2), []


def assert_same(a, b, path: str = "") -> None:
    """Assert two nested structures of tensors / dicts / lists / scalars are identical, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{path}: nan != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@case("lion_optimizer")
def _lion():
    # Lion's momentum (its only state) must survive the resume; two param groups with their own hyperparameters
    from lit_tricks.optim import Lion

    def lion(params):
        params = list(params)
        groups = [{"params": params[:-1]}, {"params": params[-1:], "lr": 1e-3, "betas": (0.8, 0.9), "weight_decay": 0}]
        return Lion(groups, lr=3e-3, weight_decay=0.1)

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10, optimizer=lion)
    return model, DigitsDataModule(batch_size=32), []


@case("layers_ghost_bn_msd_tract")
def _layers():
    # the head is wrapped up front so that the DDP harness's pre-fit parameter names match the trained ones
    from lit_tricks import ApplyGhostBatchNorm, ApplyMultiSampleDropout, ApplyTrAct
    from lit_tricks.layers import multi_sample_dropout

    model = Classifier(multi_sample_dropout(CNN2D(num_classes=10, width=8), p=0.5, samples=4), num_classes=10)
    tricks = [ApplyGhostBatchNorm(virtual_batch_size=8), ApplyMultiSampleDropout(p=0.5, samples=4), ApplyTrAct(lam=0.1)]
    return model, DigitsDataModule(batch_size=32, as_image=True), tricks


@case("distill_nd_mixup")
def _distill():
    # ND's class-mean directions live in the student (distill_loss buffer) and must survive the resume; the teacher
    # is rebuilt, never saved; Mixup's generator feeds both networks the same mixed inputs
    from lit_tricks import Distill

    teacher = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    tricks = [Mixup(alpha=0.4, seed=3), Distill(teacher, loss="nd", temperature=2.0, warmup_epochs=1)]
    return model, DigitsDataModule(batch_size=32), tricks


@case("distill_tgeo")
def _distill_tgeo():
    # TGeo's ratio network, its own Adam state, the teacher class means and the held-out position must resume
    from lit_tricks import Distill

    model = Classifier(MLP(64, 10, hidden=(16,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=32), [Distill(MLP(64, 10, hidden=(32,)), loss="tgeo", temperature=1.5)]


@case("mic_ema_masks")
def _mic():
    # the private mask generator and the EMA teacher must continue exactly after the resume
    from lit_tricks import MIC

    model = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    return model, DigitsDataModule(batch_size=32, as_image=True), [EMATeacher(decay=0.9), MIC(block_size=2, ratio=0.7)]


@case("hypernetwork_mip")
def _hypernetwork_mip():
    # the per-sample loss weights lam come from the global RNG (kept in the checkpoint by RestoresRNG)
    from torch.utils.data import DataLoader, TensorDataset

    from lit_tricks.data.loader import ResumableDataLoader
    from lit_tricks.data.sampler import EpochRandomSampler
    from lit_tricks.modules import LossConditionedRegression
    from lit_tricks.nets import HyperNetwork

    x = torch.linspace(-1, 1, 256)[:, None]
    data = TensorDataset(x, torch.cat([torch.sin(3 * x), torch.cos(3 * x)], dim=1))

    class TwoTargets(pl.LightningDataModule):
        def train_dataloader(self):
            # a private generator: worker seeds must not come from (and advance) the global RNG
            generator = torch.Generator().manual_seed(0)
            return ResumableDataLoader(data, batch_size=16, sampler=EpochRandomSampler(data), generator=generator)

        def val_dataloader(self):
            return DataLoader(data, batch_size=64)

    model = LossConditionedRegression(HyperNetwork(1, MLP(1, 1, hidden=(8,)), hidden=(8,)))
    return model, TwoTargets(), []


@case("efficient_train")
def _efficient_train():
    # the stage follows global_step over a fixed budget (total_steps: the half run has the same stages) and the
    # shifts and noise come from the private generator: both must continue exactly after the resume
    from lit_tricks import EfficientTrain

    model = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    return model, DigitsDataModule(batch_size=32, as_image=True), [EfficientTrain(total_steps=10, seed=5)]


@case("ensloss_noisy_labels")
def _ensloss():
    # the private generator of the random loss derivatives must continue exactly after the resume; under DDP
    # every rank draws the same numbers
    from lit_tricks import EnsLoss

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=32, label_noise=0.4), [EnsLoss(seed=3)]


@case("long_tail_over_sampling")
def _long_tail_over_sampling():
    # the class-balanced epoch list is a function of (seed, epoch): a resumed run, also mid-epoch, must draw the same
    # over-sampled batches; under DDP the ranks take disjoint shards of one list; validation logs the shot groups
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    datamodule = DigitsDataModule(batch_size=32, imbalance_ratio=10, label_noise=0.2, balance="over")
    return model, datamodule, []


@case("aldr_kl_noisy_labels")
def _aldr_kl():
    # ALDR-KL's per-sample lambda table must survive the resume and be filled from both DDP ranks
    from lit_tricks import LDRLoss

    model = Classifier(MLP(64, 10, hidden=(32,)), num_classes=10)
    return model, DigitsDataModule(batch_size=32, label_noise=0.4), [LDRLoss(lam=1.0, adaptive=True)]


@case("bias_loss")
def _bias_loss():
    # the running minimum / maximum of the feature variance is global state: restored on resume, gathered under DDP
    from lit_tricks import BiasLoss

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=32), [BiasLoss()]


@case("nested_dropout_noisy_labels")
def _nested_dropout():
    # the layer's private generator (in the model's state dict) must continue exactly after the resume; under DDP
    # every rank keeps the same k. The head is wrapped up front so the DDP harness's pre-fit names match.
    from lit_tricks.callbacks.nested_dropout import ApplyNestedDropout
    from lit_tricks.layers.nested_dropout import nested_dropout

    model = Classifier(nested_dropout(MLP(64, 10, hidden=(32,)), std=4.0, seed=3), num_classes=10)
    return model, DigitsDataModule(batch_size=32, label_noise=0.4), [ApplyNestedDropout(std=4.0, seed=3)]


@case("adversarial_training_reweighted")
def _adversarial_training():
    # the private generator of the PGD random starts must continue exactly after the resume; the attack runs in eval
    # mode (batch norm, dropout), and the class reweighting switches on at epoch 1, after the half run's resume
    from lit_tricks.callbacks.adversarial_training import AdversarialTraining

    model = Classifier(CNN2D(num_classes=10, width=8), num_classes=10)
    trick = AdversarialTraining(eps=0.1, steps=2, clamp_min=0, clamp_max=1, reweight_beta=0.9999, reweight_from_epoch=1)
    return model, DigitsDataModule(batch_size=32, as_image=True, imbalance_ratio=10), [trick]


def _smote_prior_correction():
    # SMOTE's synthetic samples are made once at setup, seeded: a resumed run and both DDP ranks must see the same
    # training set; the class_prior buffer of the prior correction travels in the checkpoint
    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10, prior_correction=True)
    return model, DigitsDataModule(batch_size=32, imbalance_ratio=10, smote=True), []


def _has_imblearn() -> bool:
    from importlib.util import find_spec

    return find_spec("imblearn") is not None


if _has_imblearn():  # SMOTE needs the [imbalance] extra; without it the case is left out
    case("smote_prior_correction")(_smote_prior_correction)


@case("hard_batches")
def _hard_batches():
    # the batch losses and the current round are sampler state, saved by HardBatches: a resumed run (also mid-epoch)
    # replays the same round and then picks the same hardest batches; under DDP the ranks record the all-reduced
    # loss of each global batch and choose alike. 1294 digits in batches of 200: b = 6 fixed batches, rounds of 5
    # (5 epoch-0 batches trained under limit_train_batches=5, so round 1 is the untrained batch and the 4 hardest)
    from lit_tricks.callbacks.hard_batches import HardBatches

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=200, hard_batches=0.85), [HardBatches()]


@case("adawac")
def _adawac():
    # AdaWAC's per-sample weights table must survive the resume and be filled from both DDP ranks; its two views
    # draw from the global RNG, which the resume restores. Batches of 256: 5 batches cover nearly all 1294 digits,
    # so the second epoch updates weights stored in the first
    from lit_tricks.callbacks.adawac import AdaWAC

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=256, label_noise=0.4), [AdaWAC(step_size=1.0)]


@case("rcal")
def _rcal():
    # RCAL's class Gaussians (from a pass at the start of each epoch) and its frozen encoder copy are state: a resume
    # (also mid-epoch) keeps the epoch's statistics, recomputes them at epoch 1 like the uninterrupted run, and draws
    # the same sampled features (a generator seeded by step and rank); under DDP the ranks gather the pass's
    # features and compute the same statistics
    from lit_tricks.callbacks.rcal import RCAL

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    datamodule = DigitsDataModule(batch_size=32, imbalance_ratio=10, label_noise=0.2)
    return model, datamodule, [RCAL(q=2, alpha=0.1, every_n_epochs=1)]


@case("sbcl_long_tail")
def _sbcl():
    # subclasses clustered at the start of epochs 0 and 1: a mid-epoch resume must keep epoch 0's labels (not re-cluster
    # under the newer weights), an end-of-epoch resume re-clusters exactly; the projection head is added at setup;
    # under DDP the ranks gather the clustering pass and get the same labels; the second view's noise is global RNG
    from lit_tricks.callbacks.sbcl import SBCL

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    trick = SBCL(warmup_epochs=0, every_n_epochs=1, projection_dim=16, min_subclass_size=5)
    return model, DigitsDataModule(batch_size=32, imbalance_ratio=10), [trick]


@case("temperature_scaling")
def _temperature_scaling():
    # T is fitted at each fit-time validation from the gathered logits of both DDP ranks: the resumed run and both
    # ranks must end with the same T (the checkpoint carries the T of its validation)
    from lit_tricks.callbacks.temperature_scaling import TemperatureScaling

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    return model, DigitsDataModule(batch_size=32), [TemperatureScaling()]


def _uniform_noise_images(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=generator)


@case("mixoe_outlier_exposure")
def _mixoe():
    # MixOE's outlier order (100 outliers: a new permutation every few steps), its lambda / box generator and OE's
    # callable-source generator must continue exactly after the resume; under DDP the ranks take disjoint shares of one
    # outlier stream and keep identical state; batch norm sees the ID, mixed and outlier forwards
    from lit_tricks.callbacks.mixoe import MixOE
    from lit_tricks.callbacks.ood_evaluation import OODEvaluation
    from lit_tricks.callbacks.outlier_exposure import OutlierExposure
    from lit_tricks.data.open_set import OpenSetDigitsDataModule

    datamodule = OpenSetDigitsDataModule(known_classes=6, batch_size=32, as_image=True)
    datamodule.setup()
    model = Classifier(CNN2D(num_classes=6, width=8), num_classes=6)
    tricks = [
        MixOE(datamodule.outlier_set.subset(torch.arange(100)), op="cutmix", alpha=2.0, seed=3),
        OutlierExposure(_uniform_noise_images, beta=0.5, batch_size=16, seed=4),
        OODEvaluation({"near": datamodule.near_ood_set, "far": datamodule.far_ood_set}),
    ]
    return model, datamodule, tricks


@case("si_blurry_nmc")
def _si_blurry_nmc():
    # a Si-Blurry stream (task 0 ends within the first epoch's 5 batches of 64) read by ContinualEvaluation's online
    # metrics (samples counted, seen classes, the periodic accuracies), and the NMC's class sums and counts (buffers):
    # all must survive the resume; under DDP the ranks sum each step's class sums and share their seen classes
    from lit_tricks.modules.nmc import NearestMeanClassifier

    encoder = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh())
    model = NearestMeanClassifier(encoder, num_classes=10)
    stream = ContinualDataModule(DigitsDataModule(batch_size=64), scenario="si_blurry", seed=1)
    return model, stream, [ContinualEvaluation(every_n_steps=2, eval_period=100)]


@case("few_shot_lp_ft")
def _few_shot_lp_ft():
    # LP-FT switches stage at step 4: the mid-epoch checkpoint (step 4) still holds the probe's optimizer and must
    # rebuild the fine-tune's on resume exactly as the uninterrupted run; the end-of-epoch one (step 5) holds the
    # fine-tune's Adam over every parameter. The body's dropout is off during the probe (eval mode) and draws from the
    # global RNG after the switch; under DDP every parameter is synchronised after the switch
    from lit_tricks.data.few_shot import FewShotDataModule
    from lit_tricks.modules.tta.few_shot import FewShotFineTune

    model = FewShotFineTune(MLP(64, 10, hidden=(32,), dropout=0.2), lp_steps=4, lp_lr=1e-2, lr=1e-3)
    datamodule = FewShotDataModule(DigitsDataModule(val_fraction=0.0), shots=2, steps_per_epoch=5, batch_size=16)
    return model, datamodule, []


@case("fpf")
def _fpf():
    # k-FPF: no per-step replay, a phase every 3 steps and at the task switch (task 0 -> 1 within the first epoch's
    # 5 batches of 64), the module chosen by its drift since the task start: the memory, the reference weights, the
    # task, the phases' generator and history must survive the resume (the mid-epoch checkpoint at step 4 follows the
    # phase at step 3); the phase's dropout comes from that generator, so under DDP both ranks fine-tune alike
    from lit_tricks.callbacks.fpf import FPF

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    stream = ContinualDataModule(DigitsDataModule(batch_size=64), num_tasks=5)
    fpf = FPF(
        memory_size=100, replay=False, every_n_steps=3, at_task_end=True, at_fit_end=False, finetune_steps=5, seed=1
    )
    return model, stream, [fpf, ContinualEvaluation(every_n_steps=2)]


@case("metric_learning_metrix")
def _metric_learning_metrix():
    # Metrix's private generator (the positive drawn per anchor and lambda) must continue exactly after the resume;
    # the Recall@K states are reset each validation
    from lit_tricks.data.unseen_classes import UnseenClassesDataModule
    from lit_tricks.modules.metric_learning import MetricLearner

    model = MetricLearner(MLP(64, 16, hidden=(32,)), 16, metrix="embedding", seed=3)
    return model, UnseenClassesDataModule(train_classes=5, batch_size=64), []


@case("dkvb")
def _dkvb():
    # the keys are fitted label-free at the start of the first fit only: a resumed run must take them (and the lazily
    # sized projections) from the checkpoint instead of fitting again; under DDP every rank fits the same keys on the
    # whole training set and the values' gradients are reduced as usual
    from lit_tricks.modules.dkvb import DKVB

    model = DKVB(torch.nn.Identity(), num_classes=10, num_codebooks=8, num_keys=16, key_dim=4, key_init_epochs=2)
    stream = ContinualDataModule(DigitsDataModule(batch_size=64), num_tasks=5)
    return model, stream, [ContinualEvaluation(every_n_steps=2)]


@case("barlow_twins_mixbt")
def _barlow_twins_mixbt():
    # the view generator (two augmentations per step) and the MixBT generator (permutation and lambda) must continue
    # exactly after the resume; under DDP the embeddings are gathered with their gradients (C over the global batch)
    from lit_tricks.modules.barlow_twins import BarlowTwins

    model = BarlowTwins(MLP(64, 16, hidden=(32,)), 16, projector_dims=(32, 32), mixbt=4.0, num_classes=10, seed=2)
    return model, DigitsDataModule(batch_size=32), []


@case("labo")
def _labo():
    # the class-concept matrix (the only parameter, from the language prior) and Adam's moments must resume exactly;
    # concept text embeddings of random directions, two per class
    from lit_tricks.modules.concept_bottleneck.labo import LaBo

    concepts = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    return LaBo(concepts, torch.tensor([0, 0, 1, 1, 2, 2]), 3, lr=0.05), _Features(batch_size=50, val_fraction=0.2), []


@case("prd")
def _prd():
    # PRD: the prototypes replace the MLP's head at setup, the projection is attached to the module; the frozen copy
    # taken at the task switch (task 0 -> 1 within the first epoch's 5 batches of 64), the task and the classes' tasks
    # must come back from the checkpoint (the copy rebuilt from its saved weights); the second view's augmentation
    # draws from the global RNG, which the module's checkpoint restores; under DDP the ranks switch together
    from lit_tricks.callbacks.prd import PRD

    model = Classifier(MLP(64, 10, hidden=(32,), dropout=0.2), num_classes=10)
    stream = ContinualDataModule(DigitsDataModule(batch_size=64), num_tasks=5)
    return model, stream, [PRD(projection_dim=8, projection_hidden_dim=16), ContinualEvaluation(every_n_steps=2)]


class RecordQueue(Callback):
    """Checks that each step enqueues the keys of every rank (the pointer moves by the global batch: DDP's buffer
    broadcast would hide keys a rank failed to gather), and exposes MoCo's queue and pointer at the end of the fit
    as this callback's state, so the DDP test compares them across ranks (it compares parameters, not buffers)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self._pointer = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._pointer = int(pl_module.queue_pointer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        keys = len(batch["inputs"]) * trainer.world_size
        expected = (self._pointer + keys) % len(pl_module.queue)
        if int(pl_module.queue_pointer) != expected:
            raise AssertionError(f"the queue pointer moved to {int(pl_module.queue_pointer)}, not {expected}.")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {"queue": pl_module.queue.clone(), "pointer": pl_module.queue_pointer.clone()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


@case("moco_mochi")
def _moco_mochi():
    # the queue (buffer and pointer), the momentum encoder and the view generator (which MoCHi's mixing also draws
    # from, from step 2) must continue exactly after the resume; the 96-key queue wraps every 3 steps (in the middle
    # of a batch under DDP, where the keys of both ranks, 64 a step, are gathered before the enqueue)
    from lit_tricks.modules.moco import MoCo

    model = MoCo(
        MLP(64, 16, hidden=(32,)), 16, dim=8, queue_size=96, momentum=0.9, mochi=8, mochi_s1=8, mochi_s2=4,
        mochi_start=2, num_classes=10, seed=2,
    )  # fmt: skip
    return model, DigitsDataModule(batch_size=32), [RecordQueue()]


class RecordConceptMetrics(Callback):
    """Exposes the last logged concept metrics as this callback's state, so the DDP test compares them across ranks
    (it compares only ``val/`` metrics and callback states) and the resume test between the two runs."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = {k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("tricks/ConceptMetrics/")}
        self.values = logged or self.values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.values)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.values = dict(state_dict)


@case("concept_metrics_shapes")
def _concept_metrics():
    # the concept metrics' states are sums over both ranks' validation shards, so the synced values (recorded as a
    # callback state) agree; the callback keeps nothing across epochs, so a resume only has to restore the CEM (a
    # non-linear head in the concepts)
    from lit_tricks.callbacks.concept_metrics import ConceptMetrics

    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                  torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.ReLU())  # fmt: skip
    model = ConceptEmbeddingModel(encoder, n_concepts=12, n_tasks=9, latent_dim=16, emb_size=4)
    data = ShapesDataModule(num_samples=600, batch_size=64, with_masks=True)
    return model, data, [ConceptMetrics(top_l=2), RecordConceptMetrics()]


@case("ecbm_xor")
def _ecbm():
    # ECBM: the global energy's concept flips and the dropout draw the global RNG; validation predicts by Adam over
    # free logits inside the step (no state kept between batches); under DDP the concept metrics sync
    from lit_tricks.modules.concept_bottleneck.ecbm import ECBM

    features = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU())
    model = ECBM(features, n_concepts=2, n_tasks=2, feature_dim=16, hidden_dim=8, max_steps=5)
    return model, ConceptToyDataModule("xor", num_samples=400, batch_size=64), []


@case("smmix_vit")
def _smmix_vit():
    # SMMix: the private generator (SMMix/Mixup switches, Mixup lambdas, window sides) must continue exactly after
    # the resume; the mixing reads the ViT's own attention from an eval-mode forward of the unmixed batch
    from lit_tricks.callbacks.smmix import SMMix
    from lit_tricks.nets.vit import ViT

    model = Classifier(ViT(dim=16, depth=1, heads=2), num_classes=10)
    return model, DigitsDataModule(batch_size=32, as_image=True), [SMMix(seed=5)]


@case("dn_cbm_autoencoder")
def _dn_cbm_autoencoder():
    # DN-CBM's SAE: the neurons' fire counts and the epochs since the last resampling are buffers; the resampling
    # at epoch 1's start draws inputs from the global RNG, rewrites dead neurons and zeroes their Adam moments;
    # under DDP the fire counts are summed over ranks and rank 0's new vectors broadcast
    from lit_tricks.modules.concept_bottleneck.dn_cbm import DNCBMAutoencoder

    model = DNCBMAutoencoder(8, expansion_factor=2, lr=1e-2, resample_every=1, skip_final_resamples=False)
    with torch.no_grad():
        model.sae.encoder.bias[[3, 7]] = -100.0  # dead from the start
    return model, _Features(batch_size=50, val_fraction=0.2), []


@case("constrained_cbm_decorrelated")
def _constrained_cbm():
    # ConceptDecorrelationSampler draws each epoch with replacement from (seed, epoch) alone, so a resume (also
    # mid-epoch) replays the same batches; under DDP Lightning's DistributedSamplerWrapper shards each epoch's draws
    from lit_tricks.data.constrained_cbm import ShapeScenesDataModule

    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(2),
                                  torch.nn.Flatten(), torch.nn.Linear(16, 6))  # fmt: skip
    # (a logit bottleneck: a probability bottleneck leaves its unused intervention percentiles NaN, never equal)
    model = ConceptBottleneckModel(encoder, torch.nn.Linear(6, 8), n_concepts=6, bottleneck="logit")
    return model, ShapeScenesDataModule(num_samples=500, cooccurrence=0.9, decorrelate=True, batch_size=64), []


@case("mvp")
def _mvp():
    # MVP: the keys' use counts (they scale the next key selections) and the seen classes (the -inf logits) are
    # buffers that must resume with Adam's moments; online_iter=1 so that a step is a batch (the harness counts
    # steps); the frozen ViT is rebuilt from the seed, not checkpointed; under DDP the counts are summed and the seen
    # classes united over ranks, so the ranks stay identical
    from lit_tricks.modules.mvp import MVP
    from lit_tricks.nets.vit import ViT

    vit = ViT(image_size=8, patch_size=4, dim=16, depth=3, heads=2)
    layers = dict(g_prompt_layers=(0,), g_prompt_length=2, e_prompt_layers=(1,), e_prompt_length=3)
    model = MVP(vit, num_classes=10, pool_size=3, online_iter=1, **layers)
    stream = ContinualDataModule(DigitsDataModule(batch_size=64, as_image=True), scenario="si_blurry", seed=1)
    return model, stream, [ContinualEvaluation(every_n_steps=2, eval_period=100)]
