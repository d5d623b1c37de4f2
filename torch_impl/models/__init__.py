"""The models: ResNet with torchvision's names, CLAM attention heads, and StreamingCLAM.

Imports the streaming engine (:mod:`torch_impl.streaming`) and nothing else of the project.

    resnet.py           ResNet-18/34/50, frozen batch norm, local weights; registers its blocks with the engine
    clam.py             CLAM gated-attention heads (single and multi branch), instance loss
    streaming_clam.py   StreamingCLAM = StreamingTrunk(ResNet-34 trunk) + CLAM head; ModelConfig, build_model
"""

from .clam import CLAMHead, CLAMMultiBranch, CLAMOutput, CLAMSingleBranch
from .resnet import freeze_batchnorm, load_weights, resnet18, resnet34, resnet34_trunk, resnet50, trunk
from .streaming_clam import ModelConfig, StreamingCLAM, build_model

__all__ = [
    "CLAMHead",
    "CLAMMultiBranch",
    "CLAMOutput",
    "CLAMSingleBranch",
    "ModelConfig",
    "StreamingCLAM",
    "build_model",
    "freeze_batchnorm",
    "load_weights",
    "resnet18",
    "resnet34",
    "resnet34_trunk",
    "resnet50",
    "trunk",
]
