"""Writing an export: the prediction-writer callback, its plan's cost, resume, shard threads, the output
folder policy and the card. Never imports ``data`` or ``model``.
``ParquetShardWriter`` is in ``callback``.
"""
