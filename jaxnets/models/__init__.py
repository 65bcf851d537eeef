"""Flax Linen models of the seed tutorials."""

from jaxnets.models.cnn import MnistCNN as MnistCNN
from jaxnets.models.cnn import ValidConv as ValidConv
