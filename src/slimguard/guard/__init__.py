"""Guard: keep a deployed model trustworthy.

* :mod:`~slimguard.guard.contract`: input contracts inferred from training data, editable as YAML.
* :mod:`~slimguard.guard.ood`: OOD detectors (MSP, max logit, energy, ODIN, Mahalanobis, KNN), threshold
  calibration, AUROC and FPR at 95% TPR.
* :mod:`~slimguard.guard.monitor`: rolling-window runtime monitor (confidence, OOD rate, PSI/KS drift,
  latency, error rate) with ok/warn/alert states and Prometheus text.
* :mod:`~slimguard.guard.faults`: in-place bit flips in weights and activations, SDC campaigns.
* :mod:`~slimguard.guard.protect`: range restriction, weight checksums with repair, cascade.
* :mod:`~slimguard.guard.guard`: :class:`Guard` ties them together for in-process use.
"""

from slimguard.guard.contract import Contract, ContractViolation, Violation
from slimguard.guard.faults import (
    CampaignResult,
    FaultCampaignConfig,
    flip_bit_,
    flipped,
    run_campaign,
    wilson,
)
from slimguard.guard.guard import PROTECTIONS, Guard, GuardResult
from slimguard.guard.monitor import Monitor, MonitorConfig, ks_statistic, psi
from slimguard.guard.ood import (
    DETECTORS,
    KNN,
    MSP,
    ODIN,
    Detector,
    DetectorConfig,
    Energy,
    EnergyConfig,
    KNNConfig,
    Mahalanobis,
    MahalanobisConfig,
    MaxLogit,
    ODINConfig,
    auroc,
    detector_names,
    evaluate_detectors,
    fpr_at_tpr,
    make_detector,
    register_detector,
    threshold_at_tpr,
)
from slimguard.guard.protect import (
    Cascade,
    CascadeConfig,
    RangeRestriction,
    RangeRestrictionConfig,
    WeightChecksums,
    WeightChecksumsConfig,
)

__all__ = [
    "DETECTORS",
    "KNN",
    "MSP",
    "ODIN",
    "PROTECTIONS",
    "CampaignResult",
    "Cascade",
    "CascadeConfig",
    "Contract",
    "ContractViolation",
    "Detector",
    "DetectorConfig",
    "Energy",
    "EnergyConfig",
    "FaultCampaignConfig",
    "Guard",
    "GuardResult",
    "KNNConfig",
    "Mahalanobis",
    "MahalanobisConfig",
    "MaxLogit",
    "Monitor",
    "MonitorConfig",
    "ODINConfig",
    "RangeRestriction",
    "RangeRestrictionConfig",
    "Violation",
    "WeightChecksums",
    "WeightChecksumsConfig",
    "auroc",
    "detector_names",
    "evaluate_detectors",
    "flip_bit_",
    "flipped",
    "fpr_at_tpr",
    "ks_statistic",
    "make_detector",
    "psi",
    "register_detector",
    "run_campaign",
    "threshold_at_tpr",
    "wilson",
]
