"""Model families: one module per family behind one interface (:mod:`~diffaudit.families.base`).

``sd`` (SD-1/2 U-Net), ``sdxl``, ``sd3`` and ``flux``; what U-Nets share is in :mod:`~diffaudit.families.unet`, what
diffusion transformers and flow matching share in :mod:`~diffaudit.families.flow`, the embedded models' common build
and save helpers in :mod:`~diffaudit.families.common`; :mod:`~diffaudit.families.registry` maps names to families.
"""
