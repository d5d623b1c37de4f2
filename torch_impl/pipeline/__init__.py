"""The pipeline: training, prediction, evaluation, heatmaps and the command line.

Uses every room below it: the engine (:mod:`torch_impl.streaming`), the models
(:mod:`torch_impl.models`) and the slides (:mod:`torch_impl.slides`). Modules are imported
where they are used (``from torch_impl.pipeline.train import train``), so that the command
line's ``--help`` stays quick.
"""
