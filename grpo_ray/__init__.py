"""grpo-ray: GRPO on Ray. Each folder is one process of a run (or code every process shares):

    cli.py, __main__.py   the command line; it starts the driver
    driver/               the driver process: the training loop, its recovery, rollouts in
                          flight, evaluation, checkpoints, metrics, data and models
    cluster/              the driver's handles of the remote actors: placement, the one actor
                          group with deadlines, the engine group, the reward pool
    rollout/              a rollout engine actor (vLLM)
    reward/               a reward worker actor and the reward functions it runs
    learner/              the learner actor (the LoRA policy and its update)
    sync/                 the adapter's wire from learner to engines, a file per side
    algo/                 pure math (advantages, losses): no Ray, no I/O
    config.py, contracts.py, faults.py, answer_format.py, atomic.py, logs.py
                          the vocabulary every process shares
    internals.py          the few private parts of vLLM and Ray used, each in one function

Nothing heavy is imported here or in any folder's `__init__`, so `grpo-ray --help` is instant.
"""
