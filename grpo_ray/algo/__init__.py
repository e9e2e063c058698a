"""Pure math, shared by the driver (advantages, masks) and the learner (losses): torch
functions with explicit arguments and tensor shapes in their docstrings; no Ray, no I/O, no
config objects."""
