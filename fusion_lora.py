"""FoRA (Fusion of low-Rank Adaptation, Li et al. 2025) as a PEFT LoRA variant: the adapter users import by
this name. It lives in fora/tuners/fora.py; this module gives its public names.

    from fusion_lora import ForaConfig, load_fora_config
"""

from fora.tuners.fora import ForaConfig, ForaLinear, ForaLinearVariant, load_fora_config

__all__ = ["ForaConfig", "ForaLinear", "ForaLinearVariant", "load_fora_config"]
