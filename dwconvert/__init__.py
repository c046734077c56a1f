"""dwconvert: turn the standard convs of a trained CNN into depthwise + pointwise layers.

>>> import torch, torchvision, dwconvert
>>> model = torchvision.models.resnet18()
>>> small = dwconvert.convert(model, budget=1/3, example_inputs=torch.randn(1, 3, 224, 224))
>>> print(small.dwconvert_report)
"""

from .checkpoint import load, save
from .convert import convert
from .finetune import finetune
from .inspection import ConvInspection, InspectionReport, RankError, inspect
from .layers import CPConv2d, DwPwConv2d, FactorizedConv2d, PwDwConv2d
from .ranks import BudgetError
from .report import ConversionReport, LayerRecord
from .training import FinetuneConfig, FinetuneResult

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CPConv2d",
    "ConvInspection",
    "ConversionReport",
    "DwPwConv2d",
    "FactorizedConv2d",
    "FinetuneConfig",
    "FinetuneResult",
    "InspectionReport",
    "LayerRecord",
    "PwDwConv2d",
    "RankError",
    "convert",
    "finetune",
    "inspect",
    "load",
    "save",
]
