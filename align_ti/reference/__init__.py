"""fp32 plain-PyTorch definitions of every op: the oracles the fast paths are tested against.

Nothing here imports triton; each function is written for clarity, not speed.
"""
