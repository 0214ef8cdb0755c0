"""Callbacks and tricks: one file per technique."""

from lit_tricks.callbacks.adawac import AdaWAC
from lit_tricks.callbacks.adversarial_training import AdversarialTraining
from lit_tricks.callbacks.bias_loss import BiasLoss
from lit_tricks.callbacks.concept_metrics import ConceptMetrics, ConceptView, concept_view
from lit_tricks.callbacks.continual_evaluation import ContinualEvaluation
from lit_tricks.callbacks.data_diet import DataDietScores
from lit_tricks.callbacks.distill import Distill
from lit_tricks.callbacks.efficient_train import EfficientTrain
from lit_tricks.callbacks.elr import ELR
from lit_tricks.callbacks.ema_teacher import EMATeacher
from lit_tricks.callbacks.ensloss import EnsLoss
from lit_tricks.callbacks.experience_replay import ExperienceReplay
from lit_tricks.callbacks.fpf import FPF
from lit_tricks.callbacks.ghost_batch_norm import ApplyGhostBatchNorm
from lit_tricks.callbacks.hard_batches import HardBatches
from lit_tricks.callbacks.ldr import LDRLoss
from lit_tricks.callbacks.mic import MIC
from lit_tricks.callbacks.mixoe import MixOE
from lit_tricks.callbacks.mixup import CutMix, Mixup
from lit_tricks.callbacks.multi_sample_dropout import ApplyMultiSampleDropout
from lit_tricks.callbacks.nested_dropout import ApplyNestedDropout
from lit_tricks.callbacks.neural_collapse import NeuralCollapse
from lit_tricks.callbacks.ood_evaluation import OODEvaluation
from lit_tricks.callbacks.outlier_exposure import OutlierExposure
from lit_tricks.callbacks.perp_grad import PerpendicularGradient
from lit_tricks.callbacks.prd import PRD, PrototypeHead
from lit_tricks.callbacks.rcal import RCAL
from lit_tricks.callbacks.sample_reweighting import SampleReweighting
from lit_tricks.callbacks.sbcl import SBCL
from lit_tricks.callbacks.selective_backprop import SelectiveBackprop
from lit_tricks.callbacks.self_distill import SelfDistill
from lit_tricks.callbacks.sla import SLA, SLAHead, sla_head
from lit_tricks.callbacks.smmix import SMMix
from lit_tricks.callbacks.temperature_scaling import TemperatureScaling
from lit_tricks.callbacks.tract import ApplyTrAct

__all__ = [
    "AdaWAC",
    "AdversarialTraining",
    "ApplyGhostBatchNorm",
    "ApplyMultiSampleDropout",
    "ApplyNestedDropout",
    "ApplyTrAct",
    "BiasLoss",
    "ConceptMetrics",
    "ConceptView",
    "ContinualEvaluation",
    "CutMix",
    "DataDietScores",
    "Distill",
    "ELR",
    "EMATeacher",
    "EfficientTrain",
    "EnsLoss",
    "ExperienceReplay",
    "FPF",
    "HardBatches",
    "LDRLoss",
    "MIC",
    "MixOE",
    "Mixup",
    "NeuralCollapse",
    "OODEvaluation",
    "OutlierExposure",
    "PRD",
    "PerpendicularGradient",
    "PrototypeHead",
    "RCAL",
    "SBCL",
    "SLA",
    "SLAHead",
    "SMMix",
    "SampleReweighting",
    "SelectiveBackprop",
    "SelfDistill",
    "TemperatureScaling",
    "concept_view",
    "sla_head",
]
