"""The wire between processes: only the LoRA adapter travels from the learner to the rollout
engines, and every engine proves it serves it. A file per side:

    sender.py      the learner's side: the payloads (CUDA IPC handles, packed tensors)
    receiver.py    an engine's side: the adapter into vLLM, in memory
    merged.py      an engine's side with `rollout.merge_adapter`: folded into its weights
    broadcast.py   the driver's side: export -> transport -> load -> verify -> repair
    digest.py      both ends: the exact identity of the tensors
    probe.py       the driver's judgement of the probe (pure)
    files.py       the PEFT directory format (checkpoints, `grpo-ray eval --adapter`)

Nothing heavy is imported here (peft/safetensors/ray/vllm load inside the functions)."""
