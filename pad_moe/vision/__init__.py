"""The vision track: DY-Conv, CondConv and PAD-DyConv layers, ResNet / MobileNetV2 models, data, accounting.

    from pad_moe.vision import create_model
    model = create_model("resnet18", conv="pad", kappa=0.3, num_classes=10, in_chans=3, image_size=32)

Training jobs live in ``pad_moe.vision.job`` (imported on demand: it pulls in the trainer).
"""

from pad_moe.vision.accounting import count, count_main, count_model
from pad_moe.vision.layers import CondConv2d, DynamicConv2d, KernelAttention, PadDynamicConv2d, set_temperature
from pad_moe.vision.models import CONV_TYPES, MODELS, create_model, list_models
from pad_moe.vision.temperature import TemperatureSchedule

__all__ = ["CONV_TYPES", "MODELS", "CondConv2d", "DynamicConv2d", "KernelAttention", "PadDynamicConv2d",
           "TemperatureSchedule", "count", "count_main", "count_model", "create_model", "list_models",
           "set_temperature"]
