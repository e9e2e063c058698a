"""Weight sync: only the LoRA adapter travels from the learner to the rollout engines.

`sender` (the learner's half: payloads), `broadcast` (the driver's: `AdapterBroadcast.sync`),
`receiver` (the engines': into vLLM, in memory) and `files` (the PEFT directory format).
Nothing heavy is imported here (peft/safetensors/ray/vllm load inside the functions)."""
