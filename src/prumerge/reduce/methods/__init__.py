"""One module per reduction method, each registering its :class:`prumerge.reduce.registry.ReducerSpec`.

``prumerge.reduce.registry`` imports every module here on first use, so a new method is one new file in this folder
(and its tests). Modules import torch inside their functions only: the registry is read where torch is absent.
"""
