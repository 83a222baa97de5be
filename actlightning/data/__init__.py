"""Loading, selecting, tokenizing and batching the dataset (the LightningDataModule and its steps).
``ActivationDataModule`` is in ``module``.
"""
