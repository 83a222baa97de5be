"""The model: loading only the blocks needed, capturing hidden states, the LightningModule.
``ActivationModule`` is in ``module``.
"""
