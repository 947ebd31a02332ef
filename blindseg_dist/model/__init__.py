"""Segmentation networks: backbones with InstanceNorm points, DeepLabV3+ decoder, BlindNet heads."""

from .backbones import BACKBONES, build_backbone
from .blindnet import SegNet, build_model, count_parameters

__all__ = ["BACKBONES", "SegNet", "build_backbone", "build_model", "count_parameters"]
