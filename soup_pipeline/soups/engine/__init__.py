"""The machinery the methods share: the objective and results (base), layer groupings and grids (layers), task
vectors and their merges (task_vectors), mixing, the fused inner step, torch.distributed, resumable progress."""
