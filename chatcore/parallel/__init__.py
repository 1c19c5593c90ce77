"""Tensor parallelism: one model split over N ranks (processes; on CUDA one GPU each) with torch.distributed.

``chatcore.load(path, tensor_parallel=N)`` returns an ordinary :class:`chatcore.Engine` in the caller's
process, which is rank 0; ranks 1..N-1 are worker processes it starts. Each rank loads only its shard of the
weights through the same steps as one process (:mod:`chatcore.checkpoint`; the split: :mod:`.shard`). Every
call on rank 0's model is one op of :class:`.runner.ShardRunner`, sent to the workers and run on every rank
in the same order (:meth:`.model.ParallelModel.call`); the ranks meet in the collectives of three parallel
layers (:mod:`.comm`): two all-reduces per layer, one for the embedding and one all-gather of the logits.

Roles: :mod:`.launch` starts the ranks (:mod:`.processes`: rank 0's handle on the workers' processes),
:mod:`.model` is rank 0's model, :mod:`.worker` a worker's main loop. Nothing here is imported by the model
families or the one-process loader (this package imports them, never the reverse).
"""
