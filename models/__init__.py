"""Shared model layer: Cushion, bundle format and (torch side, training only) the tapped classifier and Shields.

Importing `models`, `models.cushion`, `models.imaging` or `models.bundle` never imports torch.
"""
