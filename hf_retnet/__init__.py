"""hf_retnet: RetNet as a `transformers` model. Importing it registers model_type "hf_retnet" with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_retnet import VARIANTS, RetNetConfig
from .modeling_retnet import RetNetCache, RetNetForCausalLM, RetNetModel, RetNetPreTrainedModel

AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)

# save_pretrained() copies the modeling code and writes `auto_map`, so checkpoints load with
# trust_remote_code=True where this package is not installed (e.g. straight from the Hub).
RetNetConfig.register_for_auto_class()
RetNetModel.register_for_auto_class("AutoModel")
RetNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")

from .convert_llama import retnet_from_llama  # noqa: E402  (teacher-initialised students; see from_llama)

# LoRA targets for peft: the retention projections and the SwiGLU FFN.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

__all__ = [
    "LORA_TARGET_MODULES",
    "VARIANTS",
    "RetNetCache",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "retnet_from_llama",
]
