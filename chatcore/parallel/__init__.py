"""Tensor parallelism: one model split over N ranks (processes; on CUDA one GPU each) with torch.distributed.

``chatcore.load(path, tensor_parallel=N)`` returns an ordinary :class:`chatcore.Engine` in the caller's
process, which is rank 0; ranks 1..N-1 are worker processes it starts. Each rank reads only its shard of the
weights (:mod:`.shard`), runs the same steps in the same order (rank 0's commands, :mod:`.worker`), and the
ranks meet in two all-reduces per layer, one for the embedding and one all-gather of the logits
(:mod:`.comm`). Roles: :mod:`.launch` starts the ranks, :mod:`.model` is rank 0's model.
"""
