"""The OpenBA model family, registered with the transformers Auto classes on import.

After `import core.openba`, `AutoConfig`, `AutoModel` and `AutoModelForSeq2SeqLM` load any directory whose
config says `"model_type": "openba"`, with no `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_openba import OpenBAConfig, megatron_swiglu_width
from .modeling_openba import OpenBAForConditionalGeneration, OpenBAModel, OpenBAPreTrainedModel
from .presets import PRESETS, count_parameters, openba_config

AutoConfig.register("openba", OpenBAConfig, exist_ok=True)
AutoModel.register(OpenBAConfig, OpenBAModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(OpenBAConfig, OpenBAForConditionalGeneration, exist_ok=True)

__all__ = [
    "PRESETS",
    "OpenBAConfig",
    "OpenBAForConditionalGeneration",
    "OpenBAModel",
    "OpenBAPreTrainedModel",
    "count_parameters",
    "megatron_swiglu_width",
    "openba_config",
]
