"""The run format, split by job (FORMAT.md is its specification):

* schema.py: the run's metadata: group layout, field attributes, version, open/create, the commit marker;
* planner.py: how a field's rows are split among ranks and chunked (one writer per shard file);
* blocks.py: a block of steps as whole shard files in zarr's exact bytes; absent chunks found.
"""
