"""Weight sync: only the LoRA adapter travels from the learner to the rollout engines.
Nothing heavy is imported here (peft/safetensors/ray load inside the functions)."""
from grpo_ray.weight_sync.adapter import (AdapterBroadcast, adapter_payload, vllm_lora_name,
                                          write_adapter)

__all__ = ["AdapterBroadcast", "adapter_payload", "vllm_lora_name", "write_adapter"]
