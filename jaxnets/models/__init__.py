"""Flax Linen models of the seed tutorials."""

from jaxnets.models.cnn import MnistCNN as MnistCNN
from jaxnets.models.cnn import ValidConv as ValidConv
from jaxnets.models.mlp import TwoLayerSigmoid as TwoLayerSigmoid
from jaxnets.models.mlp import sum_squared_error as sum_squared_error
from jaxnets.models.mlp import sum_squared_error_by_hand as sum_squared_error_by_hand
from jaxnets.models.mlp import two_layer_forward as two_layer_forward
from jaxnets.models.mlp import two_layer_manual_grads as two_layer_manual_grads
from jaxnets.models.mlp import two_layer_params_from_flax as two_layer_params_from_flax
from jaxnets.models.mlp import two_layer_params_to_flax as two_layer_params_to_flax
from jaxnets.models.two_layer_many import two_layer_train_many as two_layer_train_many
