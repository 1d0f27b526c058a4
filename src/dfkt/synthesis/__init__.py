"""Where synthetic training images come from, apart from how the student learns on them."""

from dfkt.synthesis.base import Synthesizer
from dfkt.synthesis.bn_prior import BNStatsPrior, bn_prior_or_none, forward_with_prior, statistics_layers
from dfkt.synthesis.generator import GeneratorSynthesizer
from dfkt.synthesis.generator_inversion import GeneratorInversion
from dfkt.synthesis.inversion import PixelInversion
from dfkt.synthesis.pool import ImagePool

__all__ = [
    "BNStatsPrior",
    "GeneratorInversion",
    "GeneratorSynthesizer",
    "ImagePool",
    "PixelInversion",
    "Synthesizer",
    "bn_prior_or_none",
    "forward_with_prior",
    "statistics_layers",
]
