"""Training-framework callbacks that record through :func:`crucible_record.watch`.

``crucible_record.integrations.hf.RecordCallback`` (transformers.Trainer; extra ``[hf]``) and
``crucible_record.integrations.lightning.RecordCallback`` (Lightning; extra ``[lightning]``).
"""
