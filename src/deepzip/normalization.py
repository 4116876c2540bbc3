"""Input normalizations: the shipped ones by name and a user's per-channel mean and std,
checked. One home for what the data readers, the checkpoints (their recorded spec) and
the command line all need, with nothing to import but the error type."""

from __future__ import annotations

import math

from .errors import DeepzipError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN",
           "MNIST_STD", "NORMALIZATIONS", "check_normalization", "parse_normalize"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
NORMALIZATIONS = {"cifar": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "mnist": (MNIST_MEAN, MNIST_STD)}


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``cifar`` | ``imagenet`` | ``mnist`` | ``M1,M2,.../S1,S2,...`` -> (mean, std).

    One mean and one std per input channel (three for RGB, one for grey images).
    """
    key = text.strip().lower()
    if key in NORMALIZATIONS:
        return NORMALIZATIONS[key]
    try:
        mean_s, std_s = key.split("/")
        mean = tuple(float(v) for v in mean_s.split(","))
        std = tuple(float(v) for v in std_s.split(","))
    except ValueError:
        mean = std = ()
    try:
        check_normalization(mean, std)
    except DeepzipError as e:
        raise DeepzipError(f"bad --normalize {text!r}: use {', '.join(NORMALIZATIONS)}, or "
                           f"MEAN,.../STD,... per channel ({e})") from None
    return mean, std


def check_normalization(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Equal lengths (one per channel, at most 4), finite means, finite positive stds.

    A zero or NaN std would make every input NaN and every evaluation chance level.
    """
    if not 1 <= len(mean) <= 4 or len(mean) != len(std):
        raise DeepzipError(f"mean and std need one value per channel (1 to 4), got "
                           f"{len(mean)} and {len(std)}")
    if not all(math.isfinite(m) for m in mean) or not all(
            math.isfinite(s) and s > 0 for s in std):
        raise DeepzipError("means must be finite and stds finite and > 0")
